"""Issuing a period on PostgreSQL brings the planner's statistics of the tables it reads by account up
to date first, and of the tables it writes (and the feed then reads) after its first batch: planned on
tables never analyzed, every batch's look-ups were whole-table scans (mis_adapter.issue_bills.
refresh_statistics). A single-account issue (the probe, a counter's re-issue) analyzes nothing."""
from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from mis_adapter.bench_data import populate_period
from mis_adapter.issue_bills import issue_bills, refresh_statistics
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine

pytestmark = [pytest.mark.timeout(120), pytest.mark.migrated("mis")]

NOON = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
PERIOD = "202611"
READ = ("agreements", "customers", "readings")
WRITTEN = ("bills", "feed_outbox")


def _planner_rows(engine: sa.Engine) -> dict[str, float | None]:
    """Each table's row count as the planner knows it (None: never analyzed)."""
    with engine.connect() as conn:
        return {name: (None if never else float(rows)) for name, rows, never in conn.execute(sa.text(
            "SELECT c.relname, c.reltuples, coalesce(s.last_analyze, s.last_autoanalyze) IS NULL "
            "FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.relname = ANY(:names)"),
            {"names": [*READ, *WRITTEN]})}


def test_a_period_issued_in_batches_is_planned_on_fresh_statistics(pg_url: str) -> None:
    engine = make_engine(pg_url)
    populate_period(engine, 30, PERIOD, banks=("ICBC",), now=NOON)
    assert set(_planner_rows(engine).values()) == {None}, "a fresh database: nothing analyzed yet"
    summary = issue_bills(engine, ManualClock(NOON), PERIOD, batch_accounts=10)
    assert summary.bills == 30
    rows = _planner_rows(engine)
    assert {t: rows[t] for t in READ} == {t: 30.0 for t in READ}
    # analyzed once the first batch (10 bills) had committed, before the others
    assert {t: rows[t] for t in WRITTEN} == {t: 10.0 for t in WRITTEN}
    assert refresh_statistics(engine, ("agreements", "customers")) == [], "current statistics are not taken again"
    engine.dispose()


def test_one_account_issued_analyzes_nothing(pg_url: str) -> None:
    engine = make_engine(pg_url)
    people = populate_period(engine, 3, PERIOD, banks=("ICBC",), now=NOON)
    assert issue_bills(engine, ManualClock(NOON), PERIOD, accounts=[people[0][0]]).bills == 1
    assert set(_planner_rows(engine).values()) == {None}
    engine.dispose()
