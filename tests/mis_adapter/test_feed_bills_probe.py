"""On PostgreSQL the feed's batch reads probe their rows by account (LATERAL, one index probe per
account): posting's read of a batch's bills (feed._PG_BILLS_OF_ACCOUNTS) and issuance's reads of the
period's existing bills and the agreements (issue_bills._PG_EXISTING, _PG_AGREEMENTS). Given a batch's
accounts as `= ANY`, PostgreSQL read every row of the table (a sequential scan up to about 5 % of it),
so each batch grew with the table."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from sqlalchemy.engine import Connection

from mis_adapter import feed, issue_bills
from mis_adapter.bench_data import populate_period
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine

pytestmark = [pytest.mark.timeout(120), pytest.mark.migrated("mis")]

NOON = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
HOUSEHOLDS = 4_000
BATCH = 200


def _rows_read(conn: Connection, sql: str, params: dict[str, Any], table: str) -> int:
    """Rows of `table` the statement's scans read (kept or filtered out), from its plan as executed."""
    plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).scalar_one()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    read, todo = 0, [plan[0]["Plan"]]
    while todo:
        node = todo.pop()
        todo.extend(node.get("Plans", []))
        if node.get("Relation Name") == table:
            read += (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
    return read


def test_a_batch_reads_the_rows_of_its_accounts_only(pg_url: str) -> None:
    engine = make_engine(pg_url)
    people = populate_period(engine, HOUSEHOLDS, "202611", banks=("ICBC",), now=NOON)
    issue_bills.issue_bills(engine, ManualClock(NOON), "202611", batch_accounts=HOUSEHOLDS // 2)
    accts = [a for a, _bank in people[:BATCH]]
    with engine.connect() as conn:
        ids = [int(i) for (i,) in conn.exec_driver_sql(
            "SELECT bill_id FROM bills WHERE account_no = ANY(%(a)s::text[])", {"a": accts})]
        bills = {"accts": feed.list_of(conn, accts), "ids": feed.list_of(conn, ids)}
        assert sorted(r.bill_id for r in conn.exec_driver_sql(feed._PG_BILLS_OF_ACCOUNTS, bills)) == sorted(ids)
        assert _rows_read(conn, feed._PG_BILLS_OF_ACCOUNTS, bills, "bills") == BATCH

        existing = {"accts": feed.list_of(conn, accts), "period": "202611"}
        assert sorted(r.account_no for r in conn.exec_driver_sql(issue_bills._PG_EXISTING, existing)) == accts
        assert _rows_read(conn, issue_bills._PG_EXISTING, existing, "bills") == BATCH

        agreed = {"accts": feed.list_of(conn, accts), "today": NOON.date()}
        assert sorted(r.account_no for r in conn.exec_driver_sql(issue_bills._PG_AGREEMENTS, agreed)) == accts
        assert _rows_read(conn, issue_bills._PG_AGREEMENTS, agreed, "agreements") == BATCH
    engine.dispose()
