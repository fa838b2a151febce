"""On PostgreSQL the feed reads a posting batch's bills by one index probe per account
(feed._PG_BILLS_OF_ACCOUNTS): given a batch's accounts as `= ANY`, PostgreSQL read every bill of the
table (a sequential scan up to about 5 % of it), so posting a batch grew with the bills table."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from mis_adapter import feed
from mis_adapter.bench_data import populate_period
from mis_adapter.issue_bills import issue_bills
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine

pytestmark = [pytest.mark.timeout(120), pytest.mark.migrated("mis")]

NOON = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
HOUSEHOLDS = 4_000
BATCH = 200


def test_a_batch_reads_the_bills_of_its_accounts_only(pg_url: str) -> None:
    engine = make_engine(pg_url)
    people = populate_period(engine, HOUSEHOLDS, "202611", banks=("ICBC",), now=NOON)
    issue_bills(engine, ManualClock(NOON), "202611", batch_accounts=HOUSEHOLDS // 2)
    accts = [a for a, _bank in people[:BATCH]]
    with engine.connect() as conn:
        ids = [int(i) for (i,) in conn.exec_driver_sql(
            "SELECT bill_id FROM bills WHERE account_no = ANY(%(a)s::text[])", {"a": accts})]
        params = {"accts": feed.list_of(conn, accts), "ids": feed.list_of(conn, ids)}
        rows = conn.exec_driver_sql(feed._PG_BILLS_OF_ACCOUNTS, params).all()
        plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + feed._PG_BILLS_OF_ACCOUNTS, params).scalar_one()
    assert sorted(r.bill_id for r in rows) == sorted(ids)
    plan = json.loads(plan) if isinstance(plan, str) else plan
    read, todo = 0, [plan[0]["Plan"]]
    while todo:
        node = todo.pop()
        todo.extend(node.get("Plans", []))
        if node.get("Relation Name") == "bills":
            read += (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
    assert read == BATCH, "one bill per account read, none of the other accounts'"
    engine.dispose()
