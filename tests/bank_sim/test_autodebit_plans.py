"""The auto-debit consumer's batch statements on PostgreSQL probe the passbooks by key: at the server's
default page price every batch read all of the bank's passbooks twice (the lock and the debit), so a
batch cost grew with the passbooks, not with its notices (bank_sim.autodebit.prepare_engine)."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import sqlalchemy as sa

from bank_sim import autodebit, ledger
from bank_sim.bench_feed import bench_accounts, open_passbooks
from yindian_common.bulk_sql import list_param
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(120)

BANK = "ICBC"
PASSBOOKS = 10_000
BATCH = 100


def _rows_read(conn: sa.Connection, statement: Any, params: dict[str, Any]) -> int:
    """Passbook rows the statement's scans read (kept or filtered out), from its plan as executed."""
    compiled = statement.compile(dialect=conn.dialect)
    plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}",
                                compiled.construct_params(params)).scalar_one()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    read, todo = 0, [plan[0]["Plan"]]
    while todo:
        node = todo.pop()
        todo.extend(node.get("Plans", []))
        if node.get("Relation Name") == ledger.savings.name and node["Node Type"].endswith("Scan"):
            read += (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
                     + node.get("Rows Removed by Index Recheck", 0)) * node["Actual Loops"]
    return read


_DEBIT = sa.text("UPDATE savings_accounts AS s SET balance_fen = s.balance_fen - v.amt "
                 "FROM unnest(CAST(:accts AS text[]), CAST(:amts AS bigint[])) AS v(acct, amt) "
                 "WHERE s.bank_id = :bank AND s.account_no = v.acct")  # autodebit._take's statement


@pytest.mark.parametrize("prepared", [True, False])
def test_a_batch_locks_and_debits_its_passbooks_by_key(pg_url: str, prepared: bool) -> None:
    engine = make_engine(pg_url)
    accounts = bench_accounts(PASSBOOKS)
    open_passbooks(engine, BANK, accounts, now=dt.datetime(2026, 11, 28, tzinfo=dt.UTC))
    if prepared:
        autodebit.prepare_engine(engine)
    batch = accounts[PASSBOOKS // 2:PASSBOOKS // 2 + BATCH]
    with engine.connect() as conn, conn.begin() as tx:
        lock = _rows_read(conn, autodebit._BALANCES, {"p_bank": BANK, "p_accts": list_param(conn, batch)})
        debit = _rows_read(conn, _DEBIT, {"accts": batch, "amts": [1] * BATCH, "bank": BANK})
        tx.rollback()
    if prepared:
        assert (lock, debit) == (BATCH, BATCH)
    else:  # what the consumer's batches did before: each statement read every passbook
        assert lock >= PASSBOOKS and debit >= PASSBOOKS
    engine.dispose()
