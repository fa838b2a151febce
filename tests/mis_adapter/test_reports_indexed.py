"""The arrears reports' indexed path (only the bills that can be in arrears at
the as-of date are read) against the full reconstruction over every bill,
on random as-of dates after a random history of payments, same-day cancels
and a reconciliation that posts BANK_ONLY and reverses UTILITY_ONLY."""
from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import payments, reports
from mis_adapter.payments import CancelCommand, PayCommand
from mis_adapter.recon import Reconciliation
from tests.mis_adapter.test_recon import DAY_START, World, build_world

pytestmark = pytest.mark.timeout(240)
TZ = ZoneInfo("Asia/Shanghai")
HISTORY_DAYS = 4


def _history(w: World, rng: random.Random) -> None:
    """A few days of payments on random accounts (partial, exact, over), some
    cancelled the same day; bank ICBC's second day reconciled the day after
    with one payment the MIS never saw and one it should not have kept."""
    accounts = w.accounts + w.accounts[:3]
    for d in range(HISTORY_DAYS):
        day = DAY_START.date() + dt.timedelta(days=d)
        w.clock.set(dt.datetime.combine(day, dt.time(9 + d), TZ))
        for k in range(8):
            serial = f"H{d}-{k}"
            acct = rng.choice(accounts)
            amount = rng.choice([rng.randint(1, 500), rng.randint(1_000, 30_000), rng.randint(50_000, 400_000)])
            payments.pay(w.ctx, PayCommand("ICBC" if k % 2 else "ABC", serial, acct, amount, channel="COUNTER"))
            if rng.random() < 0.2:
                payments.cancel(w.ctx, CancelCommand("ICBC" if k % 2 else "ABC", f"C{serial}", serial, amount))
        if d == 2:
            prev = DAY_START.date() + dt.timedelta(days=1)
            with Reconciliation(w.engine, "ICBC", prev, rates=w.ctx.rates, now=w.clock.now()) as r:
                r.load([(1, "H1-1", _account_of(w, "ICBC", "H1-1"), _amount_of(w, "ICBC", "H1-1"), "POSTED"),
                        (2, "HX-1", w.accounts[0], 12_345, "POSTED")])
                r.close_day()


def _payment(w: World, bank: str, serial: str) -> tuple[str, int]:
    import sqlalchemy as sa
    with w.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT account_no, amount_fen FROM payments WHERE bank_id = :b AND bank_serial = :s"),
                           {"b": bank, "s": serial}).one()
    return str(row[0]), int(row[1])


def _account_of(w: World, bank: str, serial: str) -> str:
    return _payment(w, bank, serial)[0]


def _amount_of(w: World, bank: str, serial: str) -> int:
    return _payment(w, bank, serial)[1]


@pytest.fixture
def history(db_url: str, tmp_path: Path) -> Iterator[World]:
    w = build_world(db_url, tmp_path, accounts=40)
    _history(w, random.Random(20261128))
    yield w
    w.ctx.router.dispose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(days=st.integers(min_value=-420, max_value=HISTORY_DAYS + 40), branch=st.sampled_from(["", "01", "02", "03"]))
def test_indexed_arrears_equal_the_full_reconstruction_on_any_date(history: World, days: int, branch: str) -> None:
    w = history
    as_of = DAY_START.date() + dt.timedelta(days=days)
    engines = w.ctx.router.engines()
    fast = reports.arrears_summary(engines, as_of, w.ctx.rates, TZ)
    slow = reports.arrears_summary(engines, as_of, w.ctx.rates, TZ, indexed=False)
    assert fast == slow
    fast_d = [a for page in reports.arrears_detail(engines, as_of, w.ctx.rates, TZ, branch) for a in page]
    slow_d = [a for page in reports.arrears_detail(engines, as_of, w.ctx.rates, TZ, branch, indexed=False)
              for a in page]
    assert fast_d == slow_d


def test_history_moves_the_arrears(history: World) -> None:
    """The comparison above is not vacuous: the history changed what is owed
    between its first day and today, and both days have households in arrears."""
    engines = history.ctx.router.engines()
    before = reports.arrears_summary(engines, DAY_START.date() - dt.timedelta(days=1), history.ctx.rates, TZ)
    after = reports.arrears_summary(engines, DAY_START.date() + dt.timedelta(days=HISTORY_DAYS), history.ctx.rates, TZ)
    assert before.total.households > 0 and after.total.households > 0
    assert before.total.principal_fen != after.total.principal_fen


@pytest.fixture(params=[7, 1129])
def other_history(request: pytest.FixtureRequest, db_url: str, tmp_path: Path) -> Iterator[World]:
    """The same kind of history from other random draws (other accounts, amounts, cancels)."""
    w = build_world(db_url, tmp_path, accounts=40)
    _history(w, random.Random(request.param))
    yield w
    w.ctx.router.dispose()


def _event_days(w: World) -> list[dt.date]:
    """Every day on which the history changed something: settlements, reversals, due dates."""
    import sqlalchemy as sa
    pay, bill = reports.T_PAY, reports.T_BILL
    days = sa.union(sa.select(pay.c.settlement_date), sa.select(pay.c.reversed_on).where(pay.c.reversed_on.is_not(None)),
                    sa.select(bill.c.due_date))
    with w.engine.connect() as conn:
        return sorted({d for (d,) in conn.execute(days)})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), shift=st.sampled_from([-1, 0, 1]), branch=st.sampled_from(["", "01", "02"]))
def test_arrears_on_the_days_around_each_event_equal_the_full_reconstruction(
        other_history: World, data: st.DataObject, shift: int, branch: str) -> None:
    """As of the day before, of and after each settlement, reversal (same-day cancel, the reconciliation's
    UTILITY_ONLY) and due date: the reports equal the reconstruction over every bill."""
    w = other_history
    as_of = data.draw(st.sampled_from(_event_days(w))) + dt.timedelta(days=shift)
    engines = w.ctx.router.engines()
    assert reports.arrears_summary(engines, as_of, w.ctx.rates, TZ) == \
        reports.arrears_summary(engines, as_of, w.ctx.rates, TZ, indexed=False)
    assert [a for page in reports.arrears_detail(engines, as_of, w.ctx.rates, TZ, branch) for a in page] == \
        [a for page in reports.arrears_detail(engines, as_of, w.ctx.rates, TZ, branch, indexed=False) for a in page]


def test_arrears_of_a_past_date_when_the_replay_outgrows_the_in_memory_tables(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MariaDB keeps the touched bills and their replay steps in memory up to REPORT_TMP_TABLE_BYTES and on
    disk beyond: with the smallest limit the server allows (16 KiB) and 2,000 bills paid after the as-of date
    the report still answers, with the full reconstruction's money (on the other databases the limit is unused)."""
    from mis_adapter import bench_recon
    from mis_adapter.late_fee import LateFeeRates
    from yindian_common.db import make_engine

    engine = make_engine(db_url)
    accounts = [bench_recon.make_account_no("01", i + 1) for i in range(400)]
    bench_recon.create_base(engine, accounts)
    bench_recon.create_bills(engine, bench_recon.Plan(accounts, 0), 4_000)
    bench_recon.create_later_payments(engine, 2_000, bench_recon.LATER_DAY)
    monkeypatch.setattr(reports, "REPORT_TMP_TABLE_BYTES", 16 << 10)
    rates, as_of = LateFeeRates(), bench_recon.PAST_AS_OF
    try:
        summed = reports.arrears_summary([engine], as_of, rates, TZ)
        rebuilt = reports.arrears_summary([engine], as_of, rates, TZ, indexed=False)
        assert summed == rebuilt
        assert summed.total.households == 400 and summed.total.principal_fen > 0
        detail = [a for page in reports.arrears_detail([engine], as_of, rates, TZ) for a in page]
        assert sum(a.principal_fen for a in detail) == summed.total.principal_fen
        assert sum(a.late_fee_fen for a in detail) == summed.total.late_fee_fen
    finally:
        engine.dispose()


def test_a_bill_paid_today_by_a_payment_settling_tomorrow_is_in_arrears_as_of_today(db_url: str,
                                                                                   tmp_path: Path) -> None:
    """A pay after the bank's day is reconciled settles tomorrow, while the bill it pays off is marked paid
    today (paid_on is the business date). As of today the payment has not settled: the bill is still owed,
    and the report finds it although its paid_on is not after the as-of date."""
    import sqlalchemy as sa
    w = build_world(db_url, tmp_path, accounts=12)
    try:
        today = DAY_START.date()
        with Reconciliation(w.engine, "ICBC", today, rates=w.ctx.rates, now=w.clock.now()) as r:
            r.load([])
            r.close_day()
        acct = w.accounts[0]
        engines = w.ctx.router.engines()
        before = reports.arrears_summary(engines, today, w.ctx.rates, TZ)
        owed = [a for page in reports.arrears_detail(engines, today, w.ctx.rates, TZ) for a in page
                if a.account_no == acct]
        assert owed and owed[0].principal_fen > 0
        result = payments.pay(w.ctx, PayCommand("ICBC", "SETTLES-TOMORROW", acct,
                                                owed[0].principal_fen + owed[0].late_fee_fen + 10_000,
                                                channel="COUNTER"))
        assert result.settlement_date == today + dt.timedelta(days=1)
        with w.engine.connect() as conn:
            paid_on = list(conn.execute(sa.text(
                "SELECT b.paid_on FROM bills b JOIN allocations a ON a.bill_id = b.bill_id "
                "JOIN payments p ON p.payment_id = a.payment_id WHERE p.bank_serial = 'SETTLES-TOMORROW'")).scalars())
            unpaid = conn.execute(sa.text("SELECT count(*) FROM bills WHERE account_no = :a AND status <> 'PAID'"),
                                  {"a": acct}).scalar_one()
        assert paid_on and {str(d) for d in paid_on} == {today.isoformat()} and unpaid == 0  # the account paid off, its bills marked today

        assert reports.arrears_summary(engines, today, w.ctx.rates, TZ) == before
        assert reports.arrears_summary(engines, today, w.ctx.rates, TZ, indexed=False) == before
        detail = [a for page in reports.arrears_detail(engines, today, w.ctx.rates, TZ) for a in page]
        assert [a for a in detail if a.account_no == acct] == owed
        assert detail == [a for page in reports.arrears_detail(engines, today, w.ctx.rates, TZ, indexed=False)
                          for a in page]
        tomorrow = [a for page in reports.arrears_detail(engines, today + dt.timedelta(days=1), w.ctx.rates, TZ)
                    for a in page]
        assert acct not in {a.account_no for a in tomorrow}
    finally:
        w.ctx.router.dispose()
