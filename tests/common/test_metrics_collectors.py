"""Scrape-time gauges read from real databases (SQLite, PostgreSQL, MariaDB):
arrears by branch and feed backlog/lag by bank on the MIS, SUSPECT pays and
the reversal queue on the bridge's journal, pool use, database errors, and
what a scrape shows when the database is slow (the last figures, an error
counted, the scrape bounded by the statement timeout)."""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from bridge import journal as jn
from bridge import metrics_collector as bridge_collector
from mis_adapter import metrics_collector as mis_collector
from mis_adapter.db.core import Bank, BillRow, Branch, Customer
from mis_adapter.db.feed import FeedCursor, OutboxRow
from mis_adapter.migrate import upgrade
from yindian_common import business_metrics as bm
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine
from yindian_common.fields import make_account_no

pytestmark = pytest.mark.timeout(120)

NOW = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)
T0 = NOW - dt.timedelta(hours=3)
# Long enough that a test's scrapes never refresh on their own, so what they see is what the test read.
NO_AUTO_REFRESH = bm.CollectorLimits(refresh_s=3600, query_timeout_s=2.0)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = make_engine(db_url, pool_size=2)
    try:
        yield eng
    finally:
        eng.dispose()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def family(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for m in registry.collect() for s in m.samples
            if s.name == name}


def bill(account_no: str, period: str, amount_fen: int, *, status: str = "UNPAID", prepaid_applied_fen: int = 0,
         principal_paid_fen: int = 0) -> dict[str, object]:
    return {"account_no": account_no, "period": period, "kwh": 100, "amount_fen": amount_fen,
            "prepaid_applied_fen": prepaid_applied_fen, "principal_paid_fen": principal_paid_fen,
            "late_fee_paid_fen": 0, "accrual_micro": 0, "accrual_date": T0.date(), "due_date": T0.date(),
            "issued_at": T0, "status": status, "dunning": False}


def customer(account_no: str) -> dict[str, object]:
    return {"account_no": account_no, "branch_code": account_no[:2], "name": "张三", "address": "-",
            "phone": "-", "tariff_class": "RESIDENTIAL", "status": "OPEN", "prepaid_fen": 0,
            "opened_on": T0.date()}


def seed_mis(engine: sa.Engine) -> dict[str, str]:
    upgrade(engine)
    a, b, c = make_account_no("01", 1), make_account_no("01", 2), make_account_no("02", 3)
    with engine.begin() as conn:
        conn.execute(sa.insert(Branch), [{"code": x, "name": f"branch {x}"} for x in ("01", "02", "03")])
        conn.execute(sa.insert(Customer), [customer(x) for x in (a, b, c)])
        conn.execute(sa.insert(BillRow), [
            bill(a, "202609", 10_000),
            bill(a, "202610", 5_000, status="PARTIAL", principal_paid_fen=2_000),
            bill(b, "202609", 8_000, status="PAID", principal_paid_fen=8_000),
            bill(c, "202609", 7_000, prepaid_applied_fen=1_000),
        ])
        conn.execute(sa.insert(Bank), [{"bank_id": x, "name": x, "suspended": False,
                                                  "suspended_reason": ""} for x in ("ICBC", "ABC")])
        conn.execute(sa.insert(OutboxRow), [
            {"bank_id": "ICBC", "seq": s, "bill_id": s, "account_no": a, "period": "202610", "kwh": 1,
             "amount_fen": 100, "due_date": T0.date(), "issued_at": T0 + dt.timedelta(hours=s - 1)}
            for s in (1, 2, 3)])
        conn.execute(sa.insert(FeedCursor), [{"bank_id": "ICBC", "acked_through_seq": 1,
                                                        "updated_at": T0}])
    return {"a": a, "b": b, "c": c}


def test_mis_arrears_by_branch_and_feed_backlog_by_bank(engine: sa.Engine) -> None:
    accounts = seed_mis(engine)
    reg = CollectorRegistry()
    collector = mis_collector.register([engine], ManualClock(NOW), NO_AUTO_REFRESH, registry=reg)
    try:
        # Branch 01: one household owes 10,000 + (5,000 - 2,000); branch 02: 7,000 - 1,000 prepaid; 03: none.
        assert {b: sample(reg, "yindian_arrears_households", branch=b) for b in ("01", "02", "03")} == \
            {"01": 1.0, "02": 1.0, "03": 0.0}
        assert {b: sample(reg, "yindian_arrears_fen", branch=b) for b in ("01", "02", "03")} == \
            {"01": 13_000.0, "02": 6_000.0, "03": 0.0}
        # ICBC acknowledged seq 1: seqs 2 and 3 wait, the oldest issued 2 h before now. ABC has no notices.
        assert sample(reg, "yindian_feed_backlog_notices", bank="ICBC") == 2.0
        assert sample(reg, "yindian_feed_lag_seconds", bank="ICBC") == 2 * 3600.0
        assert sample(reg, "yindian_feed_backlog_notices", bank="ABC") == 0.0
        assert sample(reg, "yindian_feed_lag_seconds", bank="ABC") == 0.0

        # Figures are cached between reads: a payment shows at the next read, not at every scrape.
        with engine.begin() as conn:
            conn.execute(sa.update(BillRow).where(BillRow.account_no == accounts["c"])
                         .values(status="PAID", principal_paid_fen=6_000))
        assert sample(reg, "yindian_arrears_households", branch="02") == 1.0
        collector.refresh()
        assert sample(reg, "yindian_arrears_households", branch="02") == 0.0
        assert sample(reg, "yindian_arrears_fen", branch="02") == 0.0
    finally:
        collector.close()


def test_bridge_suspect_pays_and_reversal_queue(engine: sa.Engine) -> None:
    jn.create_schema(engine)

    def row(kind: str, serial: str, state: str, age_s: int, bank: str = "ICBC") -> dict[str, object]:
        at = NOW - dt.timedelta(seconds=age_s)
        return {"kind": kind, "serial": serial, "bank_id": bank, "amount_fen": 100, "state": state,
                "business_date": at.date(), "created_at": at, "updated_at": at, "next_attempt_ms": 0}

    with engine.begin() as conn:
        conn.execute(sa.insert(jn.requests), [
            row(jn.PAY, "P1", jn.SUSPECT, 30), row(jn.PAY, "P2", jn.SUSPECT, 5),
            row(jn.PAY, "P3", jn.REVERSING, 600), row(jn.CANCEL, "C1", jn.SUSPECT, 90),
            row(jn.PAY, "P4", jn.POSTED, 5000), row(jn.PAY, "P5", jn.PENDING, 4000),
        ])
    reg = CollectorRegistry()
    collector = bridge_collector.register(engine, ManualClock(NOW), "ICBC", NO_AUTO_REFRESH, registry=reg)
    try:
        assert sample(reg, "yindian_suspect_payments", bank="ICBC") == 2.0
        assert sample(reg, "yindian_suspect_payments_oldest_age_seconds", bank="ICBC") == 30.0
        assert sample(reg, "yindian_reversal_queue_depth", bank="ICBC") == 2.0
        assert sample(reg, "yindian_reversal_queue_oldest_age_seconds", bank="ICBC") == 600.0
    finally:
        collector.close()


def test_bridge_with_nothing_in_doubt_shows_zeros(engine: sa.Engine) -> None:
    jn.create_schema(engine)
    reg = CollectorRegistry()
    collector = bridge_collector.register(engine, ManualClock(NOW), "ABC", NO_AUTO_REFRESH, registry=reg)
    try:
        for name in ("yindian_suspect_payments", "yindian_reversal_queue_depth",
                     "yindian_reversal_queue_oldest_age_seconds"):
            assert family(reg, name) == {(("bank", "ABC"),): 0.0}
    finally:
        collector.close()


SLOW_SQL = {
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000000) "
              "SELECT count(*) FROM c",
    "postgresql": "SELECT pg_sleep(60)",
    "mysql": "SELECT SLEEP(60)",
}


class _SlowOnDemand(bm.DbGaugeCollector):
    name = "test_slow"
    specs = (bm.GaugeSpec("yindian_test_rows", "Rows.", ("db",)),)
    slow = False

    def read(self, conn: sa.Connection) -> bm.Readings:
        if self.slow:
            conn.exec_driver_sql(SLOW_SQL[conn.dialect.name]).all()
        return {"yindian_test_rows": {("x",): 1.0}}


def test_slow_database_keeps_last_figures_and_counts_an_error(engine: sa.Engine) -> None:
    collector = _SlowOnDemand([engine], bm.CollectorLimits(refresh_s=3600, query_timeout_s=0.3))
    reg = CollectorRegistry()
    reg.register(collector)
    errors_before = REGISTRY.get_sample_value("yindian_collector_errors_total", {"collector": "test_slow"}) or 0.0
    try:
        assert sample(reg, "yindian_test_rows", db="x") == 1.0
        collector.slow = True
        collector.refresh()  # stopped by the statement timeout, not by the test's timeout
        assert sample(reg, "yindian_test_rows", db="x") == 1.0
        assert REGISTRY.get_sample_value("yindian_collector_errors_total",
                                         {"collector": "test_slow"}) == errors_before + 1
    finally:
        collector.close()


def test_pool_use_and_database_errors_are_counted(engine: sa.Engine) -> None:
    db = bm.db_label(engine)
    reg = CollectorRegistry()
    reg.register(bm.PoolCollector([engine]))
    bm.instrument_engine(engine)
    bm.instrument_engine(engine)  # idempotent: one error counts once
    assert sample(reg, "yindian_db_pool_size_connections", db=db) == 2.0
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1").all()
        assert sample(reg, "yindian_db_pool_checked_out_connections", db=db) == 1.0
        before = family(REGISTRY, "yindian_db_errors_total")
        with pytest.raises(sa.exc.DBAPIError):
            conn.exec_driver_sql("SELECT * FROM no_such_table").all()
    assert sample(reg, "yindian_db_pool_checked_out_connections", db=db) == 0.0
    after = family(REGISTRY, "yindian_db_errors_total")
    moved = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert len(moved) == 1 and next(iter(moved.values())) == 1.0
    assert dict(next(iter(moved)))["db"] == db


def test_bank_labels_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm, "_banks_seen", set())
    monkeypatch.setattr(bm, "BANK_LABELS_MAX", 2)
    before = REGISTRY.get_sample_value("yindian_payments_total", {"bank": "OTHER", "channel": "COUNTER"}) or 0.0
    for bank in ("TESTB1", "TESTB2", "TESTB3", "TESTB4"):
        bm.record_payment(bank, "CHANNEL_COUNTER", 100)
    bm.record_payment("TESTB1", "SOMETHING_ELSE", 100)
    assert REGISTRY.get_sample_value("yindian_payments_total", {"bank": "TESTB1", "channel": "COUNTER"}) == 1.0
    assert REGISTRY.get_sample_value("yindian_payments_total", {"bank": "TESTB1", "channel": "OTHER"}) == 1.0
    assert REGISTRY.get_sample_value("yindian_payments_total", {"bank": "TESTB3", "channel": "COUNTER"}) is None
    assert REGISTRY.get_sample_value("yindian_payments_total",
                                     {"bank": "OTHER", "channel": "COUNTER"}) == before + 2
    assert REGISTRY.get_sample_value("yindian_payments_fen_total",
                                     {"bank": "TESTB2", "channel": "COUNTER"}) == 100.0


def test_collector_exposition_passes_promtool(sqlite_url: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    eng = make_engine(sqlite_url)
    seed_mis(eng)
    reg = CollectorRegistry()
    collector = mis_collector.register([eng], ManualClock(NOW), NO_AUTO_REFRESH, registry=reg)
    try:
        out = subprocess.run([promtool, "check", "metrics"], input=generate_latest(reg), capture_output=True,
                             timeout=30)
        assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    finally:
        collector.close()
        eng.dispose()
