"""A pay's update of its account is HOT on PostgreSQL (migration 0004_customers_hot).

Every pay that leaves money over adds it to the account's prepaid credit. With
the customers packed full (fillfactor 100, as seeded), the new version of a row
finds no room on its page: a non-HOT update, an entry in every index of the table,
and a chain of dead versions behind the account's index entry. With room on the
page it is HOT. The downgrade takes the room away again."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from mis_adapter.migrate import alembic_config, upgrade
from tests.support.databases import fresh_database
from yindian_common.db import make_engine

CUSTOMERS = 400  # several full pages
PAYS = 5  # prepaid updates of one account in one transaction


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    with fresh_database("postgresql", tmp_path) as url:
        yield url


def _seed(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO branches (code, name) VALUES ('01', 'b')"))
        conn.execute(sa.text(
            "INSERT INTO customers (account_no, branch_code, name, address, phone, tariff_class, status, "
            "prepaid_fen, opened_on) SELECT lpad(n::text, 10, '0'), '01', 'holder ' || n, 'address ' || n, "
            "'1380000' || n, 'RESIDENTIAL', 'OPEN', 0, DATE '2020-01-01' FROM generate_series(1, :n) AS n"),
            {"n": CUSTOMERS})


def _prepaid_updates(engine: sa.Engine) -> tuple[int, int]:
    """(updated, of which HOT) for PAYS prepaid credits to the first account (on the first, full page)."""
    with engine.begin() as conn:
        for _ in range(PAYS):
            conn.execute(sa.text("UPDATE customers SET prepaid_fen = prepaid_fen + 100 "
                                 "WHERE account_no = '0000000001'"))
        updated, hot = conn.execute(sa.text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                                            "WHERE relname = 'customers'")).one()
    return int(updated), int(hot)


def test_a_pays_prepaid_credit_is_a_hot_update_on_postgresql(pg_url: str) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    _seed(engine)
    assert _prepaid_updates(engine) == (PAYS, PAYS)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT prepaid_fen FROM customers WHERE account_no = '0000000001'")
                            ).scalar_one() == PAYS * 100
    engine.dispose()


def test_downgrade_packs_the_customers_again(pg_url: str) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004_customers_hot@-1")
    _seed(engine)
    updated, hot = _prepaid_updates(engine)
    assert updated == PAYS and hot < PAYS  # the full first page has no room for the new versions
    upgrade(engine)
    with engine.connect() as conn:
        options = conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'customers'")).scalar_one()
    assert "fillfactor=80" in (options or [])
    engine.dispose()
