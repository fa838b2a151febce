"""Arrears snapshots (mis_adapter/arrears_snapshot.py; reports._arrears_bills with snap): a report that
reads the snapshot of a day S equals the reconstruction over every bill (reports with indexed=False, the
one-by-one rule) for every as-of date before, at and after S, on SQLite, PostgreSQL and MariaDB, whatever
was written after the snapshot was taken: payments settled after S, reversals after S (of payments settled
before or after it), bills issued after the snapshot (stamped before or after the end of S), and a late
reconciliation of a day on or before S (a BANK_ONLY payment dated that day), after which the report must
not read the snapshot."""
from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import arrears_snapshot, bench_recon, reports
from mis_adapter.late_fee import LateFeeRates, accrued_micro
from mis_adapter.migrate import upgrade
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(600)
TZ = ZoneInfo("Asia/Shanghai")
RATES = LateFeeRates()
TARIFFS = ("RESIDENTIAL", "COMMERCIAL", "INDUSTRIAL")
# six households, two per tariff, in branches 01 and 02 (shape only: no check digit is verified here)
ACCOUNTS = [(f"0{1 + i % 2}{i:07d}{i}", TARIFFS[i % 3]) for i in range(6)]
BASE = dt.date(2025, 6, 1)
EARLY = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def _clean(conn: sa.Connection) -> None:
    for t in ("arrears_snapshot_bills", "arrears_snapshots", "allocations", "payments", "bills", "reconciled_days"):
        conn.execute(sa.text(f"DELETE FROM {t}"))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = make_engine(db_url, sqlite_synchronous="NORMAL")
    upgrade(eng)
    with eng.begin() as conn:
        conn.execute(sa.text("INSERT INTO branches (code, name) VALUES ('01', 'one'), ('02', 'two')"))
        conn.execute(sa.text("INSERT INTO banks (bank_id, name, suspended, suspended_reason) "
                             "VALUES ('B', 'bank', false, '')"))
        for account, tariff in ACCOUNTS:
            conn.execute(sa.text(
                "INSERT INTO customers (account_no, branch_code, name, address, phone, tariff_class, status, "
                "prepaid_fen, opened_on) VALUES (:a, :br, 'n', '-', '13800000000', :t, 'OPEN', 0, :d)")
                .bindparams(sa.bindparam("d", type_=sa.Date)), {"a": account, "br": account[:2], "t": tariff,
                                                                "d": BASE})
    yield eng
    eng.dispose()


class Books:
    """Bills and payments written as Pay, Cancel and the reconciliation leave them: each bill row follows
    from its allocations (principal and fee paid by the posted ones, accrued to the latest settlement,
    paid_on when fully paid)."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self.sqlite = conn.dialect.name == "sqlite"
        self.bills: dict[int, dict[str, Any]] = {}
        self.payments: dict[int, dict[str, Any]] = {}
        self.next_payment = 1

    def _t(self, t: dt.datetime) -> dt.datetime:
        return t.replace(tzinfo=None) if self.sqlite else t

    def bill(self, n: int, b: dict[str, Any], issued_at: dt.datetime) -> None:
        account, _tariff = ACCOUNTS[b["account"]]
        due = BASE + dt.timedelta(days=b["due"])
        self.bills[n] = {**b, "account_no": account, "due_date": due, "allocs": []}
        self.conn.execute(reports.T_BILL.insert().values(
            bill_id=n, account_no=account, period=f"{b['year']}{n:02d}", kwh=1, amount_fen=b["amount"],
            prepaid_applied_fen=b["prepaid"], principal_paid_fen=b["migrated"], late_fee_paid_fen=b["migrated_fee"],
            accrual_micro=0, accrual_date=due, due_date=due, issued_at=self._t(issued_at), status="UNPAID",
            paid_on=None, dunning=False))
        self._settle_row(n)

    def pay(self, n: int, principal: int, fee: int, day: dt.date) -> int:
        pid = self.next_payment
        self.next_payment += 1
        bill = self.bills[n]
        self.payments[pid] = {"bill": n, "principal": principal, "fee": fee, "day": day, "state": "POSTED"}
        bill["allocs"].append(pid)
        self.conn.execute(reports.T_PAY.insert().values(
            payment_id=pid, bank_id="B", bank_serial=f"S{pid}", state="POSTED", account_no=bill["account_no"],
            branch_code=bill["account_no"][:2], amount_fen=principal + fee, channel="COUNTER", outlet_code="",
            teller_id="", settlement_date=day, posted_at=self._t(EARLY), arrears_after_fen=0, prepaid_after_fen=0,
            prepaid_added_fen=0, reversed_on=None))
        self.conn.execute(reports.T_ALLOC.insert().values(payment_id=pid, bill_id=n, late_fee_fen=fee,
                                                          principal_fen=principal))
        self._settle_row(n)
        return pid

    def reverse(self, pid: int, day: dt.date) -> None:
        p = self.payments[pid]
        p["state"], p["reversed_on"] = "REVERSED", day
        self.conn.execute(reports.T_PAY.update().where(reports.T_PAY.c.payment_id == pid)
                          .values(state="REVERSED", reversed_on=day))
        self._settle_row(p["bill"])

    def _accrual(self, n: int) -> tuple[int, dt.date]:
        """The bill's accrual as Pay and Cancel leave it, its payments and reversals taken in the order of their
        days: each payment accrues the fee on the principal unpaid then up to its day; a reversal restores the
        principal and leaves the accrual (payments._undo_payment)."""
        b = self.bills[n]
        events = sorted([(self.payments[p]["day"], 0, p) for p in b["allocs"]]
                        + [(self.payments[p]["reversed_on"], 1, p) for p in b["allocs"]
                           if self.payments[p]["state"] == "REVERSED"])
        unpaid, micro, since = b["amount"] - b["prepaid"] - b["migrated"], 0, b["due_date"]
        tariff, year = ACCOUNTS[b["account"]][1], b["year"]
        for day, kind, p in events:
            if kind == 0:
                micro += accrued_micro(unpaid, since, day, tariff_class=tariff, bill_year=year, rates=RATES)
                since = max(since, day)
                unpaid -= self.payments[p]["principal"]
            else:
                unpaid += self.payments[p]["principal"]
        return micro, since

    def _settle_row(self, n: int) -> None:
        b = self.bills[n]
        posted = [self.payments[p] for p in b["allocs"] if self.payments[p]["state"] == "POSTED"]
        paid = b["migrated"] + sum(p["principal"] for p in posted)
        unpaid = b["amount"] - b["prepaid"] - paid
        micro, since = self._accrual(n)
        self.conn.execute(reports.T_BILL.update().where(reports.T_BILL.c.bill_id == n).values(
            principal_paid_fen=paid, late_fee_paid_fen=b["migrated_fee"] + sum(p["fee"] for p in posted),
            accrual_micro=micro, accrual_date=since,
            status="PAID" if unpaid <= 0 else "UNPAID",
            paid_on=(max([p["day"] for p in posted], default=BASE - dt.timedelta(days=100)) if unpaid <= 0
                     else None)))


allocation = st.tuples(st.integers(1, 40_000), st.sampled_from([0, 0, 100, 250]), st.integers(-30, 300),
                       st.one_of(st.none(), st.integers(0, 60)))   # reversed, days after settled
bill = st.fixed_dictionaries({
    "account": st.integers(0, len(ACCOUNTS) - 1), "amount": st.integers(1, 200_000),
    "prepaid": st.sampled_from([0, 0, 500]), "migrated": st.sampled_from([0, 0, 300]),
    "migrated_fee": st.sampled_from([0, 0, 100]), "due": st.integers(-20, 200), "year": st.sampled_from([2024, 2025]),
    "allocations": st.lists(allocation, max_size=4)})
# stamped before or after the end of S; written before the job ran (issued between the end of S and the job)
# or after it
later_bill = st.tuples(bill, st.sampled_from(["before", "after"]), st.booleans())


def _reports(e: sa.Engine, as_of: dt.date, indexed: bool) -> tuple[Any, ...]:
    return (reports.arrears_summary([e], as_of, RATES, TZ, indexed=indexed),
            [a for page in reports.arrears_detail([e], as_of, RATES, TZ, indexed=indexed, page_accounts=4)
             for a in page],
            [a for page in reports.arrears_detail([e], as_of, RATES, TZ, "02", indexed=indexed) for a in page])


def _snapshot_read(e: sa.Engine, as_of: dt.date) -> dict[str, Any] | None:
    with e.connect() as conn, conn.begin():
        return reports._snapshot_of(conn, as_of, RATES)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bills=st.lists(bill, min_size=1, max_size=5), later=st.lists(later_bill, max_size=2),
       s_day=st.integers(-10, 250), late_close=st.booleans(), data=st.data())
def test_a_report_from_the_snapshot_equals_the_reconstruction(engine: sa.Engine, bills: list[dict[str, Any]],
                                                             later: list[tuple[dict[str, Any], str, bool]], s_day: int,
                                                             late_close: bool, data: st.DataObject) -> None:
    snap_day = BASE + dt.timedelta(days=s_day)
    end_of_s = reports.end_of_day_utc(snap_day, TZ)
    with engine.begin() as conn:
        _clean(conn)
    # before the snapshot: every bill and every payment, reversed on any day (those after S may also come
    # after the snapshot: drawn below)
    after: list[tuple[str, Any]] = []
    with engine.begin() as conn:
        books = Books(conn)
        for n, b in enumerate(bills, start=1):
            books.bill(n, b, EARLY)
            for principal, fee, settled, reversed_after in b["allocations"]:
                day = BASE + dt.timedelta(days=settled)
                if day > snap_day and data.draw(st.booleans(), "paid after the snapshot"):
                    after.append(("pay", (n, principal, fee, day, reversed_after)))
                    continue
                pid = books.pay(n, principal, fee, day)
                if reversed_after is not None:
                    on = day + dt.timedelta(days=reversed_after)
                    if on > snap_day and data.draw(st.booleans(), "reversed after the snapshot"):
                        after.append(("reverse", (pid, on)))
                    else:
                        books.reverse(pid, on)
    # Bill ids grow with each insert (the snapshot's premise: arrears_snapshot), so the later bills written
    # before the job take the lower ids and those written after it the higher ones.
    later_ids = {k: len(bills) + 1 + rank for rank, k in
                 enumerate(sorted(range(len(later)), key=lambda k: not later[k][2]))}

    def issue_later(before_job: bool) -> None:
        for k, (b, stamped, pre) in enumerate(later):
            if pre != before_job:
                continue
            i = later_ids[k]
            books.bill(i, b, EARLY if stamped == "before" else end_of_s + dt.timedelta(days=b["due"] % 7))
            for principal, fee, settled, _rev in b["allocations"][:1]:
                books.pay(i, principal, fee, max(BASE + dt.timedelta(days=settled), snap_day + dt.timedelta(days=1)))

    with engine.begin() as conn:
        books.conn = conn
        issue_later(True)
    clock = ManualClock(end_of_s + dt.timedelta(days=1))
    built = arrears_snapshot.build(engine, clock, snap_day)
    assert built.outcome == "BUILT"
    # after the snapshot: nothing dated on or before S but a reconciliation of such a day
    with engine.begin() as conn:
        books.conn = conn
        for kind, args in after:
            if kind == "pay":
                n, principal, fee, day, reversed_after = args
                pid = books.pay(n, principal, fee, day)
                if reversed_after is not None:
                    books.reverse(pid, max(day + dt.timedelta(days=reversed_after), snap_day + dt.timedelta(days=1)))
            else:
                books.reverse(*args)
        issue_later(False)
        if late_close:
            closed = snap_day - dt.timedelta(days=data.draw(st.integers(0, 5), "closed late"))
            books.pay(1, data.draw(st.integers(1, 40_000), "bank only"), 0, closed)
            conn.execute(reports.T_RECON.insert().values(bank_id="B", settlement_date=closed,
                                                         reconciled_at=EARLY.replace(tzinfo=None) if books.sqlite
                                                         else EARLY, summary_json=""))
    events = sorted({s_day, s_day - 1, s_day + 1, *(b["due"] for b in bills),
                     *(a[2] for b in bills for a in b["allocations"])})
    for day in {s_day, data.draw(st.sampled_from(events), "an event"), data.draw(st.integers(-40, 400), "any"),
                data.draw(st.integers(s_day, s_day + 90), "after")}:
        as_of = BASE + dt.timedelta(days=day)
        read = _snapshot_read(engine, as_of)
        assert read == (None if late_close or as_of < snap_day else
                        {"snap_day": snap_day, "bills_upto": read and read["bills_upto"]}), as_of
        assert _reports(engine, as_of, True) == _reports(engine, as_of, False), (as_of, snap_day, read)


def test_the_snapshot_path_is_taken_and_matters(engine: sa.Engine) -> None:
    """Not vacuous: a snapshot whose bill row is changed behind its back (what the argument says never
    happens) changes the report that reads it, and only that report."""
    with engine.begin() as conn:
        books = Books(conn)
        books.bill(1, {"account": 0, "amount": 10_000, "prepaid": 0, "migrated": 0, "migrated_fee": 0, "due": 0,
                       "year": 2025, "allocations": []}, EARLY)
    day = BASE + dt.timedelta(days=30)
    arrears_snapshot.build(engine, ManualClock(reports.end_of_day_utc(day, TZ) + dt.timedelta(days=1)), day)
    before = _reports(engine, day, True)
    assert before == _reports(engine, day, False)
    assert before[0].total.principal_fen == 10_000
    with engine.begin() as conn:
        conn.execute(reports.T_SNAP_BILL.update().values(unpaid_fen=7_000))
    assert _reports(engine, day, True)[0].total.principal_fen == 7_000
    assert _reports(engine, day - dt.timedelta(days=1), True)[0].total.principal_fen == 10_000  # before S


def test_retention_keeps_the_newest_days_and_month_ends() -> None:
    days = [dt.date(2026, 1, 31) + dt.timedelta(days=i) for i in range(0, 120, 3)] + \
        [dt.date(2026, 2, 28), dt.date(2026, 3, 31), dt.date(2026, 4, 30)]
    kept = arrears_snapshot.kept(days, arrears_snapshot.Retention(keep_days=3, month_ends=2))
    newest = sorted(days)[-3:]
    assert kept == {*newest, dt.date(2026, 4, 30), dt.date(2026, 3, 31)}
    assert arrears_snapshot.kept(days, arrears_snapshot.Retention(keep_days=1, month_ends=0)) == {max(days)}
    with pytest.raises(Exception, match="arrears_snapshots_keep_days"):
        arrears_snapshot.Retention(keep_days=0)


def _reconciled(conn: sa.Connection, bank: str, day: dt.date) -> None:
    conn.execute(reports.T_RECON.insert().values(
        bank_id=bank, settlement_date=day, summary_json="",
        reconciled_at=EARLY.replace(tzinfo=None) if conn.dialect.name == "sqlite" else EARLY))


def _snapshot_days(e: sa.Engine) -> list[dt.date]:
    with e.connect() as conn:
        return sorted(r[0] for r in conn.execute(sa.select(reports.T_SNAP.c.as_of)
                                                 .where(reports.T_SNAP.c.state == "READY")))


def test_the_serve_job_snapshots_each_closed_day_and_keeps_what_its_retention_says(engine: sa.Engine) -> None:
    """serve's job (SnapshotJob.run_once, one pass): nothing before any day is closed; each day once its
    last bank has reconciled it and it has been over for the margin; a pass with nothing new builds
    nothing; the retention given (2 newest, no month ends) drops the older; a late reconciliation of an
    older day makes the next pass take the newest day again. Reports read its snapshot and equal the
    reconstruction."""
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO banks (bank_id, name, suspended, suspended_reason) "
                             "VALUES ('C', 'other', false, '')"))
        books = Books(conn)
        books.bill(1, {"account": 0, "amount": 10_000, "prepaid": 0, "migrated": 0, "migrated_fee": 0,
                       "due": 0, "year": 2025, "allocations": []}, EARLY)
    clock = ManualClock(dt.datetime(2026, 3, 10, 0, 5, tzinfo=TZ))
    job = arrears_snapshot.SnapshotJob([engine], clock, 60, arrears_snapshot.Retention(keep_days=2, month_ends=0))
    assert job.run_once() == []
    with engine.begin() as conn:
        _reconciled(conn, "B", dt.date(2026, 3, 6))
    assert [b.outcome for b in job.run_once()] == ["BUILT"]      # B is the only bank that has closed a day
    with engine.begin() as conn:
        for day in (7, 8, 9):
            _reconciled(conn, "B", dt.date(2026, 3, day))
        for day in (6, 7):
            _reconciled(conn, "C", dt.date(2026, 3, day))
    assert [(b.day, b.outcome) for b in job.run_once()] == [(dt.date(2026, 3, 7), "BUILT")]  # C closed the 7th
    assert [b.outcome for b in job.run_once()] == ["EXISTS"]
    with engine.begin() as conn:
        _reconciled(conn, "C", dt.date(2026, 3, 8))
        _reconciled(conn, "C", dt.date(2026, 3, 9))
    assert [b.outcome for b in job.run_once()] == ["BUILT"]      # the 9th ended 5 minutes ago: the 8th
    clock.advance(dt.timedelta(minutes=10))
    assert [(b.day, b.outcome) for b in job.run_once()] == [(dt.date(2026, 3, 9), "BUILT")]
    assert _snapshot_days(engine) == [dt.date(2026, 3, 8), dt.date(2026, 3, 9)]
    with engine.begin() as conn:
        books.conn = conn
        books.pay(1, 4_000, 0, dt.date(2026, 3, 5))
        _reconciled(conn, "C", dt.date(2026, 3, 5))     # late: the snapshots of the 8th and 9th are stale
    assert _snapshot_read(engine, dt.date(2026, 3, 9)) is None
    assert [(b.day, b.outcome) for b in job.run_once()] == [(dt.date(2026, 3, 9), "BUILT")]
    assert _snapshot_days(engine) == [dt.date(2026, 3, 9)]
    assert _snapshot_read(engine, dt.date(2026, 3, 9)) is not None
    got = _reports(engine, dt.date(2026, 3, 9), True)
    assert got == _reports(engine, dt.date(2026, 3, 9), False)
    assert got[0].total.principal_fen == 6_000


def test_serve_takes_the_snapshot_by_itself(tmp_path: Any) -> None:
    """A real `mis_adapter serve` with a short job interval takes the snapshot of the closed day on its own
    (SQLite; the job's rules are tested above on every database)."""
    from tests.support import procs

    url = f"sqlite:///{tmp_path / 'mis.db'}"
    e = make_engine(url)
    try:
        upgrade(e)
        with e.begin() as conn:
            conn.execute(sa.text("INSERT INTO banks (bank_id, name, suspended, suspended_reason) "
                                 "VALUES ('B', 'bank', false, '')"))
            _reconciled(conn, "B", dt.date(2026, 3, 9))
        proc = procs.start("mis_adapter", ["mis_adapter", "serve", "--db", url, "--listen", "127.0.0.1:0",
                                           "--metrics-port", "0", "--insecure",
                                           "--clock-start", "2026-03-10T09:00:00+08:00",
                                           "--arrears-snapshot-interval-s", "0.2"], log_dir=tmp_path)
        try:
            deadline = time.monotonic() + 60
            while not _snapshot_days(e) and time.monotonic() < deadline:
                threading.Event().wait(0.1)
            assert _snapshot_days(e) == [dt.date(2026, 3, 9)]
        finally:
            assert proc.terminate() == 0
    finally:
        e.dispose()


def test_a_late_reconciliation_drops_the_snapshot_and_a_new_one_is_taken(engine: sa.Engine) -> None:
    """A reconciliation of a day on or before S committed after the snapshot: reports stop reading it at
    once (equal to the reconstruction with the late payment), the next job drops it and takes it again,
    and the retention rule drops the snapshots it does not keep."""
    with engine.begin() as conn:
        books = Books(conn)
        books.bill(1, {"account": 0, "amount": 10_000, "prepaid": 0, "migrated": 0, "migrated_fee": 0, "due": 0,
                       "year": 2025, "allocations": []}, EARLY)
    day = BASE + dt.timedelta(days=30)
    clock = ManualClock(reports.end_of_day_utc(day, TZ) + dt.timedelta(days=1))
    assert arrears_snapshot.build(engine, clock, day).bills == 1
    assert arrears_snapshot.build(engine, clock, day).outcome == "EXISTS"
    with engine.begin() as conn:
        books.conn = conn
        books.pay(1, 4_000, 0, day - dt.timedelta(days=2))
        conn.execute(reports.T_RECON.insert().values(bank_id="B", settlement_date=day - dt.timedelta(days=2),
                                                     reconciled_at=EARLY.replace(tzinfo=None) if books.sqlite
                                                     else EARLY, summary_json=""))
    assert _snapshot_read(engine, day) is None
    assert _reports(engine, day, True) == _reports(engine, day, False)
    assert _reports(engine, day, True)[0].total.principal_fen == 6_000
    again = arrears_snapshot.build(engine, clock, day)
    assert (again.outcome, again.bills) == ("BUILT", 1)
    assert _snapshot_read(engine, day) is not None
    assert _reports(engine, day, True)[0].total.principal_fen == 6_000
    # too early: the day is not over for the margin yet
    with pytest.raises(Exception, match="has not been over"):
        arrears_snapshot.build(engine, ManualClock(reports.end_of_day_utc(day, TZ)), day)
    for i in range(1, arrears_snapshot.ARREARS_SNAPSHOTS_KEEP_DAYS + 2):
        arrears_snapshot.build(engine, ManualClock(clock.now() + dt.timedelta(days=i)), day + dt.timedelta(days=i))
    with engine.connect() as conn:
        left = sorted(r[0] for r in conn.execute(sa.select(reports.T_SNAP.c.as_of)))
        rows = conn.execute(sa.select(sa.func.count()).select_from(reports.T_SNAP_BILL)).scalar_one()
    assert left == [day + dt.timedelta(days=i) for i in range(2, arrears_snapshot.ARREARS_SNAPSHOTS_KEEP_DAYS + 2)]
    assert rows == len(left)


def test_the_bench_data_from_snapshots(db_url: str) -> None:
    """The bench's shape (bench_recon --snapshots): 300 households, later payments; today's and the past
    date's reports from their snapshots equal the reconstruction, for every branch and one."""
    e = make_engine(db_url)
    try:
        accounts = [bench_recon.make_account_no("01", i + 1) for i in range(300)]
        bench_recon.create_base(e, accounts)
        bench_recon.create_bills(e, bench_recon.Plan(accounts, 0), 3_000)
        bench_recon.create_later_payments(e, 1_000, bench_recon.LATER_DAY)
        # today's day: the 600 unpaid bills; the month end: also the 1,000 bills a later payment paid
        assert [r[2] for r in bench_recon.take_snapshots(e)] == ["BUILT, 600 bills", "BUILT, 1,600 bills"]
        for as_of in (dt.date(2026, 11, 28), bench_recon.PAST_AS_OF):
            assert _snapshot_read(e, as_of) is not None
            assert _reports(e, as_of, True) == _reports(e, as_of, False)
    finally:
        e.dispose()


SCENARIOS = ["paid after", "reversed after", "issued after, stamped before", "issued after", "closed late",
             "paid after the report's day", "reversed after the report's day"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_write_after_the_snapshot_shows_in_the_report(engine: sa.Engine, scenario: str) -> None:
    """One household, two bills of 10,000 fen (the second paid 3,000 before S); after the snapshot of S
    one write of each kind that can come later. The report as of S + 5 from the snapshot shows it and
    equals the reconstruction (each case fails if its part of the snapshot path is left out)."""
    snap_day = BASE + dt.timedelta(days=40)
    end_of_s = reports.end_of_day_utc(snap_day, TZ)
    unpaid = {"account": 0, "amount": 10_000, "prepaid": 0, "migrated": 0, "migrated_fee": 0, "due": 0,
              "year": 2025, "allocations": []}
    with engine.begin() as conn:
        books = Books(conn)
        books.bill(1, unpaid, EARLY)
        books.bill(2, unpaid, EARLY)
        paid_before = books.pay(2, 3_000, 0, snap_day - dt.timedelta(days=3))
    arrears_snapshot.build(engine, ManualClock(end_of_s + dt.timedelta(days=1)), snap_day)
    as_of = snap_day + dt.timedelta(days=5)
    assert _reports(engine, as_of, True)[0].total.principal_fen == 17_000
    with engine.begin() as conn:
        books.conn = conn
        if scenario == "paid after":
            books.pay(1, 4_000, 0, snap_day + dt.timedelta(days=2))
        elif scenario == "reversed after":
            books.reverse(paid_before, snap_day + dt.timedelta(days=1))
        elif scenario == "paid after the report's day":
            books.pay(1, 4_000, 0, as_of + dt.timedelta(days=1))
        elif scenario == "reversed after the report's day":
            books.reverse(paid_before, as_of + dt.timedelta(days=1))
        elif scenario.startswith("issued after"):
            books.bill(3, unpaid, EARLY if scenario.endswith("before") else end_of_s + dt.timedelta(hours=1))
        else:
            books.pay(1, 4_000, 0, snap_day - dt.timedelta(days=1))
            conn.execute(reports.T_RECON.insert().values(bank_id="B", settlement_date=snap_day - dt.timedelta(days=1),
                                                         reconciled_at=EARLY.replace(tzinfo=None) if books.sqlite
                                                         else EARLY, summary_json=""))
    expected = {"paid after": 13_000, "reversed after": 20_000, "issued after, stamped before": 27_000,
                "issued after": 27_000, "closed late": 13_000, "paid after the report's day": 17_000,
                "reversed after the report's day": 17_000}[scenario]
    got = _reports(engine, as_of, True)
    assert (got[0].total.principal_fen, got[1][0].principal_fen) == (expected, expected)
    assert got == _reports(engine, as_of, False)
    assert (_snapshot_read(engine, as_of) is None) == (scenario == "closed late")


def test_a_bill_issued_after_the_day_but_before_the_job_is_in_later_reports(engine: sa.Engine) -> None:
    """The job runs after the day has ended and every bank has reconciled it; bills issued in between (ids
    below the largest when the job ran, issued after the day) are not in the snapshot, and a report for a
    later date still has them (bills_upto is lowered below the first of them). It failed when bills_upto
    was the largest id."""
    snap_day = BASE + dt.timedelta(days=40)
    end_of_s = reports.end_of_day_utc(snap_day, TZ)
    unpaid = {"account": 0, "amount": 10_000, "prepaid": 0, "migrated": 0, "migrated_fee": 0, "due": 0,
              "year": 2025, "allocations": []}
    with engine.begin() as conn:
        books = Books(conn)
        books.bill(1, unpaid, EARLY)
        books.bill(2, {**unpaid, "account": 1}, end_of_s + dt.timedelta(hours=8))   # the next morning's run
        books.bill(3, {**unpaid, "account": 2}, EARLY)                               # a run begun before it ended
    built = arrears_snapshot.build(engine, ManualClock(end_of_s + dt.timedelta(days=1)), snap_day)
    assert built.bills == 1
    assert _snapshot_read(engine, snap_day) == {"snap_day": snap_day, "bills_upto": 1}
    for as_of, households in ((snap_day, 2), (snap_day + dt.timedelta(days=1), 3)):
        got = _reports(engine, as_of, True)
        assert (got[0].total.households, got[0].total.principal_fen) == (households, households * 10_000)
        assert got == _reports(engine, as_of, False)


def test_a_bill_touched_only_after_the_reports_day_is_read_from_the_snapshot(engine: sa.Engine) -> None:
    """Not vacuous: the snapshot holds the bill as it stood at S even when a later payment paid it; a report
    for a date between reads that row, not the bill's history (a change behind the snapshot's back shows),
    while a report after the payment replays it."""
    snap_day = BASE + dt.timedelta(days=40)
    with engine.begin() as conn:
        books = Books(conn)
        books.bill(1, {"account": 0, "amount": 10_000, "prepaid": 0, "migrated": 0, "migrated_fee": 0, "due": 0,
                       "year": 2025, "allocations": []}, EARLY)
        books.pay(1, 10_000, 0, snap_day + dt.timedelta(days=20))
    arrears_snapshot.build(engine, ManualClock(reports.end_of_day_utc(snap_day, TZ) + dt.timedelta(days=1)),
                           snap_day)
    between, after = snap_day + dt.timedelta(days=10), snap_day + dt.timedelta(days=20)
    assert _reports(engine, between, True) == _reports(engine, between, False)
    assert _reports(engine, between, True)[0].total.principal_fen == 10_000
    with engine.begin() as conn:
        conn.execute(reports.T_SNAP_BILL.update().values(unpaid_fen=7_000))
    assert _reports(engine, between, True)[0].total.principal_fen == 7_000
    assert _reports(engine, after, True) == _reports(engine, after, False)
    assert _reports(engine, after, True)[0].total.households == 0


def test_the_migration_makes_the_declared_tables_and_its_downgrade_removes_them(db_url: str) -> None:
    from mis_adapter.migrate import downgrade

    e = make_engine(db_url)
    try:
        upgrade(e)
        for table in (reports.T_SNAP, reports.T_SNAP_BILL):
            insp = sa.inspect(e)
            assert {c["name"] for c in insp.get_columns(table.name)} == {c.name for c in table.columns}
            assert set(insp.get_pk_constraint(table.name)["constrained_columns"]) == \
                {c.name for c in table.primary_key.columns}
        downgrade(e, "0004_reportsx_snapshot_format@-1")
        assert {c["name"] for c in sa.inspect(e).get_columns("arrears_snapshots")} == \
            {c.name for c in reports.T_SNAP.columns} - {"format", "rates"}
        assert "replay_ok" not in {c["name"] for c in sa.inspect(e).get_columns("arrears_snapshot_bills")}
        downgrade(e, "0004_arrears_snapshots@-1")
        assert not {"arrears_snapshots", "arrears_snapshot_bills"} & set(sa.inspect(e).get_table_names())
        upgrade(e)
        assert {"arrears_snapshots", "arrears_snapshot_bills"} <= set(sa.inspect(e).get_table_names())
    finally:
        e.dispose()


def test_a_report_reading_a_snapshot_while_it_is_dropped_stays_whole(engine: sa.Engine) -> None:
    """A detail read page by page: after its first page the snapshot it reads is dropped (retention); the
    pages still add up to the report as it began (it reads one snapshot of the database); the next report
    reconstructs from every bill and equals it."""
    unpaid = {"account": 0, "amount": 10_000, "prepaid": 0, "migrated": 0, "migrated_fee": 0, "due": 0,
              "year": 2025, "allocations": []}
    day = BASE + dt.timedelta(days=30)
    with engine.begin() as conn:
        books = Books(conn)
        for n in range(1, len(ACCOUNTS) + 1):
            books.bill(n, {**unpaid, "account": n - 1}, EARLY)
    arrears_snapshot.build(engine, ManualClock(reports.end_of_day_utc(day, TZ) + dt.timedelta(days=1)), day)
    as_of = day + dt.timedelta(days=1)
    whole = _reports(engine, as_of, True)
    pages = reports.arrears_detail([engine], as_of, RATES, TZ, page_accounts=1)
    first = next(pages)
    arrears_snapshot._drop(engine, day)
    assert [first, *pages] == [[a] for a in whole[1]]
    assert _snapshot_read(engine, as_of) is None
    assert _reports(engine, as_of, True) == whole


def test_the_job_takes_the_newest_day_every_bank_has_closed(engine: sa.Engine) -> None:
    """The command's default day: the newest day that every bank which has reconciled a day has
    reconciled, never today nor a day that ended less than the margin ago; none before any reconciliation.
    The command takes it and reports what it did."""
    clock = ManualClock(dt.datetime(2026, 3, 10, 0, 5, tzinfo=TZ))  # 5 minutes into 10 March
    assert arrears_snapshot.newest_closed_day(engine, clock) is None
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO banks (bank_id, name, suspended, suspended_reason) "
                             "VALUES ('C', 'other', false, '')"))
        for bank, days in (("B", (5, 6, 9)), ("C", (4, 7))):
            for d in days:
                conn.execute(reports.T_RECON.insert().values(
                    bank_id=bank, settlement_date=dt.date(2026, 3, d), summary_json="",
                    reconciled_at=EARLY.replace(tzinfo=None) if engine.dialect.name == "sqlite" else EARLY))
    assert arrears_snapshot.newest_closed_day(engine, clock) == dt.date(2026, 3, 7)
    with engine.begin() as conn:
        conn.execute(reports.T_RECON.insert().values(
            bank_id="C", settlement_date=dt.date(2026, 3, 9), summary_json="",
            reconciled_at=EARLY.replace(tzinfo=None) if engine.dialect.name == "sqlite" else EARLY))
    assert arrears_snapshot.newest_closed_day(engine, clock) == dt.date(2026, 3, 8)  # 9 March ended 5 min ago
    clock.advance(dt.timedelta(minutes=10))
    assert arrears_snapshot.newest_closed_day(engine, clock) == dt.date(2026, 3, 9)
    url = engine.url.render_as_string(hide_password=False)
    assert arrears_snapshot.main(["--db", url, "--clock-start", clock.now().isoformat()]) == 0
    assert _snapshot_read(engine, dt.date(2026, 3, 9)) == {"snap_day": dt.date(2026, 3, 9), "bills_upto": 0}
    assert arrears_snapshot.main(["--db", url, "--day", "2026-03-10", "--clock-start",
                                  clock.now().isoformat()]) == 2  # today: refused


def test_postgresql_reads_every_bill_when_many_payments_came_after_the_snapshot(
        engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL only reads a snapshot while few payments were settled between its day and the report's
    (reports.ARREARS_SNAPSHOT_PG_CHANGED_MAX); either way the report is the same."""
    unpaid = {"account": 0, "amount": 10_000, "prepaid": 0, "migrated": 0, "migrated_fee": 0, "due": 0,
              "year": 2025, "allocations": []}
    day = BASE + dt.timedelta(days=30)
    with engine.begin() as conn:
        books = Books(conn)
        books.bill(1, unpaid, EARLY)
        books.bill(2, unpaid, EARLY)
        books.pay(1, 4_000, 0, day + dt.timedelta(days=1))
    arrears_snapshot.build(engine, ManualClock(reports.end_of_day_utc(day, TZ) + dt.timedelta(days=1)), day)
    as_of = day + dt.timedelta(days=1)
    expected = _reports(engine, as_of, False)
    assert _snapshot_read(engine, as_of) is not None
    monkeypatch.setattr(reports, "ARREARS_SNAPSHOT_PG_CHANGED_MAX", 0)
    assert (_snapshot_read(engine, as_of) is None) == (engine.dialect.name == "postgresql")
    assert _reports(engine, as_of, True) == expected
    assert expected[0].total.principal_fen == 16_000


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_on_sqlite_a_pay_commits_while_the_snapshot_is_computed(engine: sa.Engine,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite has one write lock for the whole database: a snapshot reconstructed in a write transaction
    (seconds at a million bills) would make every pay wait out its busy timeout and fail. A writer with no
    busy timeout at all commits while the reconstruction's statement runs, and the snapshot, copied in
    afterwards in chunks, is whole (it failed with the reconstruction in the write transaction, and lost
    the last row when the chunks' bounds were off by one)."""
    snap_day = BASE + dt.timedelta(days=40)
    unpaid = {"account": 0, "amount": 10_000, "prepaid": 0, "migrated": 0, "migrated_fee": 0, "due": 0,
              "year": 2025, "allocations": []}
    with engine.begin() as conn:
        books = Books(conn)
        for n in range(1, 6):
            books.bill(n, {**unpaid, "account": n}, EARLY)
    account = ACCOUNTS[0][0]
    committed: list[str] = []
    monkeypatch.setattr(arrears_snapshot, "ARREARS_SNAPSHOT_COPY_ROWS", 2)  # 5 rows: copied in three chunks

    def pay_meanwhile(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # the first INSERT … SELECT is the reconstruction of the snapshot's rows (the header's is INSERT … VALUES)
        upper = statement.upper()
        if committed or "INSERT INTO" not in upper or "SELECT" not in upper:
            return
        import sqlite3
        other = sqlite3.connect(engine.url.database or "", timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # what every writer of ours takes (yindian_common.db)
            other.execute("UPDATE customers SET prepaid_fen = prepaid_fen + 100 WHERE account_no = ?", (account,))
            other.execute("COMMIT")
            committed.append("committed")
        except sqlite3.OperationalError as e:
            committed.append(str(e))
        finally:
            other.close()

    sa.event.listen(engine, "before_cursor_execute", pay_meanwhile)
    try:
        built = arrears_snapshot.build(engine, ManualClock(reports.end_of_day_utc(snap_day, TZ)
                                                           + dt.timedelta(days=1)), snap_day)
    finally:
        sa.event.remove(engine, "before_cursor_execute", pay_meanwhile)
    assert committed == ["committed"]
    assert built.bills == 5
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT prepaid_fen FROM customers WHERE account_no = :a"),
                            {"a": account}).scalar_one() == 100
    got = _reports(engine, snap_day, True)
    assert (got[0].total.households, got[0].total.principal_fen) == (5, 50_000)
    assert got == _reports(engine, snap_day, False)
