"""Migration 0004_feedx_no_parent_fks: on PostgreSQL, allocations and bills carry no
foreign-key triggers (their writers name parents read or written in the same
transaction, and no parent is ever deleted); MariaDB and SQLite keep the keys; the
downgrade brings them back. And the policy that makes the keys redundant: no code
deletes a bill, a payment or a customer."""
from __future__ import annotations

import re
from pathlib import Path

import sqlalchemy as sa

from mis_adapter.migrate import downgrade, upgrade
from yindian_common.db import make_engine

ROOT = Path(__file__).resolve().parents[2]
KEYS = {("allocations", "bills"), ("allocations", "payments"), ("bills", "customers")}


def _parent_keys(engine: sa.Engine) -> set[tuple[str, str]]:
    insp = sa.inspect(engine)
    return {(table, fk["referred_table"]) for table in ("allocations", "bills")
            for fk in insp.get_foreign_keys(table)}


def test_postgresql_drops_the_parent_keys_of_allocations_and_bills_and_the_downgrade_restores_them(
        db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        dropped = engine.dialect.name == "postgresql"
        assert _parent_keys(engine) == (set() if dropped else KEYS)
        downgrade(engine, "0004_feedx_no_parent_fks@-1")
        assert _parent_keys(engine) == KEYS
        upgrade(engine)
        assert _parent_keys(engine) == (set() if dropped else KEYS)
    finally:
        engine.dispose()


# A delete of a parent table, as SQLAlchemy Core or as SQL text, anywhere in the product's code.
_DELETES = re.compile(r"\b(T_BILLS|T_PAY|T_CUST|T_PAYMENTS|T_CUSTOMERS)\.delete\(|"
                      r"DELETE\s+FROM\s+(bills|payments|customers)\b|"
                      r"sa\.delete\((T_BILLS|T_PAY|T_CUST|BillRow|Payment|Customer)\b", re.IGNORECASE)


def test_no_code_deletes_a_bill_a_payment_or_a_customer() -> None:
    found = [f"{path.relative_to(ROOT)}:{n}" for pkg in ("mis_adapter", "bank_sim", "bridge", "yindian_common")
             for path in sorted((ROOT / pkg).rglob("*.py")) if "migrations" not in path.parts
             for n, line in enumerate(path.read_text().splitlines(), 1) if _DELETES.search(line)]
    assert found == []
