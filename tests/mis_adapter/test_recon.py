"""Reconciliation of a bank's day against a seeded MIS on SQLite and
PostgreSQL: every outcome constructed on purpose, exact counts and fen, the
MIS changed exactly as the outcomes say, the day closed to cancels, a second
reconciliation replaying the stored result, and refused input changing
nothing.

Every scenario runs on one database and on three branch databases (a front
database that is also branch 01's, plus 02 and 03: tests.support.topology)
through recon_branches.reconciliation, as the Reconcile stream does; there
the scenario's accounts alternate between the branches and every row, count
and fen is read over all three databases. test_recon_branches.py adds what
only the branch topology has (a branch failing mid-close, the wire stream)."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from mis_adapter import payments, recon, recon_branches, recon_staging
from mis_adapter.banks import lock_bank_day
from mis_adapter.context import AdapterContext
from mis_adapter.payments import CancelCommand, PayCommand
from mis_adapter.seed import seed
from mis_adapter.settings import AdapterSettings
from tests.support.topology import BRANCHES3, SINGLE, Topology, topology_databases, total
from yindian_common import fields
from yindian_common.clock import ManualClock, business_date
from yindian_common.errors import DayClosed, InvalidField, SerialConflict
from yindian_common.fields import make_account_no

pytestmark = [pytest.mark.timeout(120), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema

TZ8 = dt.timezone(dt.timedelta(hours=8))
DAY_START = dt.datetime(2026, 11, 28, 10, 0, tzinfo=TZ8)
BANK = "ICBC"
SNAPSHOT_TABLES = ("payments", "allocations", "bills", "customers", "prepaid_ledger", "cancels", "journal",
                   "recon_lines", "reconciled_days")


@dataclass
class World:
    ctx: AdapterContext
    clock: ManualClock
    engine: sa.Engine        # the primary (and, with branches, front) database
    accounts: list[str]      # accounts with unpaid bills, most owing first (alternating branches when split)

    @property
    def engines(self) -> list[sa.Engine]:
        return self.ctx.router.engines()

    @property
    def split(self) -> bool:
        return self.ctx.router.split

    def db_of(self, account: str) -> int:
        """The index in `engines` of the database holding the account."""
        return self.engines.index(self.ctx.router.engine_for(account))


def build_world(topo: Topology | str, tmp_path: Path, accounts: int = 60) -> World:
    """A seeded MIS; with branch databases three times the households, so that each branch has enough."""
    if isinstance(topo, str):
        topo = Topology(SINGLE, topo)
    clock = ManualClock(DAY_START)
    ctx = AdapterContext.build(AdapterSettings(db=topo.db, branch_db=topo.branch_db, sqlite_synchronous="NORMAL"),
                               clock)
    seed(ctx.router, accounts * (3 if topo.split else 1), tmp_path / "rosters", today=business_date(clock),
         now=clock.now(), arrears_share=0.6)
    per_db: list[list[str]] = []
    for engine in ctx.router.engines():
        with engine.connect() as conn:
            per_db.append([r[0] for r in conn.execute(sa.text(
                "SELECT account_no FROM bills WHERE status <> 'PAID' GROUP BY account_no "
                "ORDER BY SUM(amount_fen) DESC, account_no"))])
    # most owing first in each database, taken in turn: with branches the scenario's accounts span them
    owing = [acct for row in zip(*per_db, strict=False) for acct in row]
    return World(ctx, clock, ctx.router.primary, owing)


@pytest.fixture
def world(topology: Topology, tmp_path: Path) -> Iterator[World]:
    w = build_world(topology, tmp_path)
    yield w
    w.ctx.router.dispose()


@pytest.fixture
def world_lite(topology_lite: Topology, tmp_path: Path) -> Iterator[World]:
    """`world` without PostgreSQL branch databases: for refusals that stop before any SQL that differs."""
    w = build_world(topology_lite, tmp_path)
    yield w
    w.ctx.router.dispose()


@pytest.fixture(params=[pytest.param((b, t), id=f"{b}-{t}") for t in (SINGLE, BRANCHES3)
                        for b in ("sqlite", "postgresql", "mariadb")])
def world_all(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """The same on SQLite, PostgreSQL and MariaDB."""
    with topology_databases(*request.param, tmp_path, schema="mis") as topo:
        w = build_world(topo, tmp_path)
        yield w
        w.ctx.router.dispose()


def snapshot(w: World) -> dict[str, dict[Any, tuple[Any, ...]]]:
    """Every row of the money tables over every MIS database, keyed by (primary key..., database index)."""
    out: dict[str, dict[Any, tuple[Any, ...]]] = {name: {} for name in SNAPSHOT_TABLES}
    for i, engine in enumerate(w.engines):
        md = sa.MetaData()
        md.reflect(engine, only=SNAPSHOT_TABLES)
        with engine.connect() as conn:
            for name in SNAPSHOT_TABLES:
                t = md.tables[name]
                pk = [c.name for c in t.primary_key.columns]
                out[name].update({(*(r._mapping[c] for c in pk), i): tuple(r) for r in conn.execute(sa.select(t))})
    return out


def changed(before: dict[str, dict[Any, Any]], after: dict[str, dict[Any, Any]]) -> dict[str, set[Any]]:
    out = {}
    for name in SNAPSHOT_TABLES:
        keys = {k for k in before[name].keys() | after[name].keys() if before[name].get(k) != after[name].get(k)}
        if keys:
            out[name] = keys
    return out


def pay(w: World, serial: str, account: str, amount: int, bank: str = BANK) -> payments.PayResult:
    return payments.pay(w.ctx, PayCommand(bank, serial, account, amount))


def cancel(w: World, serial: str, original: str, amount: int) -> payments.CancelResult:
    return payments.cancel(w.ctx, CancelCommand(BANK, serial, original, amount))


def run(w: World, records: list[tuple[str, str, int, str]], *, trailer: tuple[int, int] | None = None,
        batch: int = 3) -> recon.ReconSummary:
    staged = [(i + 1, *r) for i, r in enumerate(records)]
    with recon_branches.reconciliation(w.ctx.router, BANK, business_date(w.clock), rates=w.ctx.rates,
                                       now=w.clock.now()) as r:
        for start in range(0, len(staged), batch):
            r.load(staged[start:start + batch])
        if trailer is not None:
            r.check_trailer(*trailer)
        return r.close_day()  # type: ignore[no-any-return]


def lines(w: World) -> dict[str, recon.Discrepancy]:
    out: dict[str, recon.Discrepancy] = {}
    for engine in w.engines:
        for page in recon.stored_lines(engine, BANK, business_date(w.clock), page_rows=4):
            for d in page:
                assert d.bank_serial not in out, f"{d.bank_serial} has lines in two databases"
                out[d.bank_serial] = d
    return out


def stored_summary(w: World) -> recon.ReconSummary | None:
    return recon_branches.day_summary(w.ctx.router, BANK, business_date(w.clock))


def closed_in(w: World) -> list[int]:
    """The databases whose reconciled_days row says the day is closed."""
    return [i for i, e in enumerate(w.engines) if total([e], sa.text("SELECT COUNT(*) FROM reconciled_days"))]


def bill_state(w: World, account: str) -> list[tuple[Any, ...]]:
    with w.ctx.router.engine_for(account).connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT bill_id, principal_paid_fen, late_fee_paid_fen, status, paid_on FROM bills "
            "WHERE account_no = :a ORDER BY bill_id"), {"a": account})]


def prepaid(w: World, account: str) -> int:
    with w.ctx.router.engine_for(account).connect() as conn:
        return int(conn.execute(sa.text("SELECT prepaid_fen FROM customers WHERE account_no = :a"),
                                {"a": account}).scalar_one())


def test_every_outcome_exact_and_the_mis_changes_only_as_they_say(world_all: World) -> None:
    w = world_all
    a = w.accounts
    # Yesterday's payment that the bank lists again today.
    w.clock.set(DAY_START - dt.timedelta(days=1))
    pay(w, "Y-1", a[0], 500)
    w.clock.set(DAY_START)
    pay(w, "M-1", a[0], 1_000)
    pay(w, "M-2", a[1], 2_000)
    pay(w, "PAIR", a[2], 300)
    cancel(w, "C-PAIR", "PAIR", 300)
    before_u = {acct: (bill_state(w, acct), prepaid(w, acct)) for acct in (a[3], a[4])}
    pay(w, "U-1", a[3], 700)          # the bank never sends it
    pay(w, "U-2", a[4], 999_999)      # the bank sends it CANCELLED (its cancel never arrived); creates prepaid
    pay(w, "X-AMT", a[5], 1_000)
    pay(w, "X-ACC", a[6], 1_000)
    pay(w, "X-REV", a[7], 400)
    cancel(w, "C-REV", "X-REV", 400)
    cancel(w, "C-TOMB", "X-TOMB", 800)  # overtook its payment: tombstone
    pay(w, "M-1", a[0], 1_000, bank="ABC")  # another bank's serial space: untouched
    before_bank_only = bill_state(w, a[8])
    unknown_account = make_account_no("09", 9_999_999)
    # the bank's account for X-ACC: another branch's (another database's, when split)
    x_acc_bank = next(x for x in a[9:] if x[:2] != a[6][:2] and w.db_of(x) != w.db_of(a[6]) or not w.split)
    records = [
        ("M-1", a[0], 1_000, "POSTED"),
        ("M-2", a[1], 2_000, "POSTED"),
        ("PAIR", a[2], 300, "CANCELLED"),
        ("U-2", a[4], 999_999, "CANCELLED"),
        ("B-1", a[8], 1_500, "POSTED"),
        ("B-GONE", a[9], 200, "CANCELLED"),       # cancelled at the bank, never reached the MIS
        ("X-AMT", a[5], 1_200, "POSTED"),
        ("X-ACC", x_acc_bank, 1_000, "POSTED"),
        ("X-REV", a[7], 400, "POSTED"),
        ("X-TOMB", a[10], 800, "POSTED"),
        ("Y-1", a[0], 500, "POSTED"),
        ("B-NOACCT", unknown_account, 600, "POSTED"),
    ]
    mis_before = {s: p for s, p in _mis_payments(w).items()}
    snap = snapshot(w)

    summary = run(w, records, trailer=(len(records), sum(r[2] for r in records)))

    got = {t.outcome: (t.count, t.amount_fen) for t in summary.totals}
    assert got == {  # outcome: (count, fen); the bank's amount where the bank sent the record
        recon.MATCHED: (4, 1_000 + 2_000 + 300 + 200),                    # M-1, M-2, PAIR, B-GONE
        recon.BANK_ONLY: (1, 1_500),                                       # B-1
        recon.UTILITY_ONLY: (2, 999_999 + 700),                            # U-2 (bank CANCELLED), U-1 (MIS only)
        recon.MISMATCH: (6, 1_200 + 1_000 + 400 + 800 + 500 + 600),        # X-*, Y-1, B-NOACCT
    }
    assert summary.record_count == len(records)
    assert not summary.replayed
    # What the bank owes: the day's payments still posted in the MIS (M-1, M-2, B-1, X-AMT, X-ACC).
    assert summary.net_settlement_fen == 1_000 + 2_000 + 1_500 + 1_000 + 1_000
    assert summary.net_settlement_fen == _posted_fen(w)

    found = lines(w)
    assert {s: d.outcome for s, d in found.items()} == {
        "B-1": recon.BANK_ONLY, "U-1": recon.UTILITY_ONLY, "U-2": recon.UTILITY_ONLY, "X-AMT": recon.MISMATCH,
        "X-ACC": recon.MISMATCH, "X-REV": recon.MISMATCH, "X-TOMB": recon.MISMATCH, "Y-1": recon.MISMATCH,
        "B-NOACCT": recon.MISMATCH}
    assert found["X-AMT"].detail == recon.DETAIL_AMOUNT and found["X-AMT"].mis_amount_fen == 1_000
    assert found["X-ACC"].detail == recon.DETAIL_ACCOUNT and found["X-ACC"].mis_account_no == a[6]
    assert found["X-REV"].mis_state == "REVERSED" and found["X-TOMB"].mis_state == "TOMBSTONE"
    assert found["Y-1"].detail == recon.DETAIL_OTHER_DAY
    assert "not found" in found["B-NOACCT"].detail
    assert found["U-1"].bank_status == "" and found["U-1"].mis_amount_fen == 700
    assert found["B-1"].bank_line_no == 5

    # The pure rule agrees with what the SQL decided (B-NOACCT was BANK_ONLY until it could not be posted).
    day = business_date(w.clock)
    for i, rec in enumerate(records):
        outcome, _ = recon.classify((i + 1, *rec), mis_before.get(rec[0]), day)
        sql_outcome = found[rec[0]].outcome if rec[0] in found else recon.MATCHED
        assert outcome == (recon.BANK_ONLY if rec[0] == "B-NOACCT" else sql_outcome), rec[0]
    assert recon.classify(None, mis_before["U-1"], day) == (recon.UTILITY_ONLY, recon.DETAIL_REVERSED_NOW)

    # The MIS changed exactly as the outcomes say.
    after = snapshot(w)
    diff = changed(snap, after)
    pays = _mis_payments(w)
    assert pays["U-1"].state == "REVERSED" and pays["U-2"].state == "REVERSED"
    assert pays["B-1"].state == "POSTED" and pays["B-1"].settlement_date == day
    assert pays["X-AMT"].state == "POSTED" and pays["X-ACC"].state == "POSTED"
    assert "B-NOACCT" not in pays
    changed_payments = {after["payments"].get(k, snap["payments"].get(k))[2] for k in diff["payments"]}
    assert changed_payments == {"U-1", "U-2", "B-1"}
    for acct, (bills, credit) in before_u.items():
        assert bill_state(w, acct) == bills
        assert prepaid(w, acct) == credit
    assert bill_state(w, a[8]) != before_bank_only
    with w.ctx.router.engine_for(a[8]).connect() as conn:  # B-1 posted in its account's database
        b1 = conn.execute(sa.text("SELECT payment_id, amount_fen, prepaid_added_fen FROM payments "
                                  "WHERE bank_id = 'ICBC' AND bank_serial = 'B-1'")).one()
        allocated = conn.execute(sa.text("SELECT COALESCE(SUM(late_fee_fen + principal_fen), 0) FROM allocations "
                                         "WHERE payment_id = :p"), {"p": b1.payment_id}).scalar_one()
    assert allocated + b1.prepaid_added_fen == 1_500
    bill_ids_touched = {(row[0], w.db_of(acct)) for acct in (a[3], a[4], a[8]) for row in bill_state(w, acct)}
    assert {(k[0], k[-1]) for k in diff.get("bills", set())} <= bill_ids_touched
    assert {after["customers"].get(k, snap["customers"].get(k))[0] for k in diff.get("customers", set())} <= {
        a[3], a[4], a[8]}
    assert set(diff) <= {"payments", "allocations", "bills", "customers", "prepaid_ledger", "journal",
                         "recon_lines", "reconciled_days"}

    # The day is closed: cancels are refused, and reconciling again replays and changes nothing.
    with pytest.raises(DayClosed):
        cancel(w, "C-LATE", "M-2", 2_000)
    snap2 = snapshot(w)
    again = run(w, records[:2])
    assert again.replayed
    assert (again.totals, again.net_settlement_fen, again.record_count) == (
        summary.totals, summary.net_settlement_fen, summary.record_count)
    assert lines(w) == found
    assert snapshot(w) == snap2
    if w.split:  # closed in every branch database; the BANK_ONLY serial is one payment across branches
        assert closed_in(w) == [0, 1, 2]
        with pytest.raises(DayClosed):
            cancel(w, "C-LATE-2", "M-1", 1_000)
        with pytest.raises(SerialConflict):
            pay(w, "B-1", next(x for x in a if w.db_of(x) != w.db_of(a[8])), 1_500)


def _mis_payments(w: World) -> dict[str, recon.MisPayment]:
    """The bank's payments over every MIS database; a serial held by two is a failure."""
    out: dict[str, recon.MisPayment] = {}
    for engine in w.engines:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT bank_serial, account_no, amount_fen, state, settlement_date "
                                        "FROM payments WHERE bank_id = 'ICBC'")).all()
        for r in rows:
            assert r[0] not in out, f"serial {r[0]} in two databases"
            out[r[0]] = recon.MisPayment(r[0], r[1] or "", r[2], r[3], _date(r[4]))
    return out


def _date(v: Any) -> dt.date:
    return v if isinstance(v, dt.date) else dt.date.fromisoformat(v)


def _posted_fen(w: World) -> int:
    return total(w.engines, sa.select(sa.func.sum(payments.T_PAY.c.amount_fen)).where(
        payments.T_PAY.c.bank_id == BANK, payments.T_PAY.c.state == "POSTED",
        payments.T_PAY.c.settlement_date == business_date(w.clock)))


BAD_RECORDS = [
    (("S-3", "0100000010", 100, "POSTED"), "records[3].account_no"),
    (("S 3", None, 100, "POSTED"), "records[3].bank_serial"),
    (("S-3", None, 0, "POSTED"), "records[3].amount_fen"),
    (("S-3", None, 100, "LOST"), "records[3].status"),
]


def test_a_bad_record_is_refused_naming_it_and_nothing_changes(world_lite: World) -> None:
    w = world_lite
    pay(w, "S-1", w.accounts[0], 100)
    pay(w, "S-9", w.accounts[1], 100)  # would be UTILITY_ONLY if anything were applied
    snap = snapshot(w)
    for bad, field in BAD_RECORDS:
        bad_rec = (bad[0], bad[1] or w.accounts[2], bad[2], bad[3])
        with pytest.raises(InvalidField) as err:
            run(w, [("S-1", w.accounts[0], 100, "POSTED"), ("S-2", w.accounts[1], 100, "CANCELLED"), bad_rec])
        assert err.value.field == field
    assert snapshot(w) == snap
    assert stored_summary(w) is None


def test_duplicates_and_a_wrong_trailer_are_refused_and_nothing_changes(world: World) -> None:
    w = world
    pay(w, "S-1", w.accounts[0], 100)
    snap = snapshot(w)
    recs = [("S-1", w.accounts[0], 100, "POSTED"), ("S-2", w.accounts[1], 50, "POSTED"),
            ("S-1", w.accounts[0], 100, "POSTED")]
    with pytest.raises(InvalidField) as err:
        run(w, recs)
    assert "S-1 at records[1] and records[3]" in err.value.message
    with pytest.raises(InvalidField) as err:
        run(w, recs[:2], trailer=(2, 151))
    assert err.value.field == "trailer.total_fen"
    with pytest.raises(InvalidField) as err:
        run(w, recs[:2], trailer=(3, 150))
    assert err.value.field == "trailer.record_count"
    assert snapshot(w) == snap
    # After the refusals a correct run still works and closes the day.
    summary = run(w, recs[:2], trailer=(2, 150))
    assert summary.total(recon.BANK_ONLY).count == 1 and summary.total(recon.MATCHED).count == 1


@given(st.text(alphabet="0123456789x ", min_size=8, max_size=11))
@settings(max_examples=500, deadline=None)
def test_fast_account_check_agrees_with_the_field_rule(account: str) -> None:
    try:
        fields.account_no(account)
        valid = True
    except InvalidField:
        valid = False
    assert fields.account_no_ok(account) == valid


@given(st.integers(min_value=0, max_value=99), st.integers(min_value=0, max_value=9_999_999))
@settings(max_examples=300, deadline=None)
def test_fast_account_check_accepts_every_valid_number(branch: int, serial: int) -> None:
    assert fields.account_no_ok(make_account_no(f"{branch:02d}", serial))


def test_two_reconciliations_of_a_day_at_once_apply_it_once(world: World) -> None:
    import threading

    w = world
    pay(w, "K-1", w.accounts[0], 1_000)
    pay(w, "K-2", w.accounts[1], 2_000)  # not in the bank's records: reversed, once
    records = [(1, "K-1", w.accounts[0], 1_000, "POSTED"), (2, "K-3", w.accounts[2], 300, "POSTED")]
    runs = [recon_branches.reconciliation(w.ctx.router, BANK, business_date(w.clock), rates=w.ctx.rates,
                                          now=w.clock.now()) for _ in range(2)]
    for r in runs:
        r.__enter__()
        r.load(records)
    start = threading.Barrier(2)
    results: list[recon.ReconSummary] = []

    def close(r: Any) -> None:
        start.wait(timeout=30)
        results.append(r.close_day())

    threads = [threading.Thread(target=close, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in runs:
        r.__exit__(None, None, None)
    assert sorted(s.replayed for s in results) == [False, True]
    assert results[0].totals == results[1].totals
    journal: dict[str, int] = {}
    for engine in w.engines:
        with engine.connect() as conn:
            for outcome, n in conn.execute(sa.text("SELECT outcome, COUNT(*) FROM journal WHERE rpc = 'RECONCILE' "
                                                   "GROUP BY outcome")):
                journal[outcome] = journal.get(outcome, 0) + n
    # each database closes the day once (with branches: three DAY_CLOSED lines, one per database)
    assert journal == {"BANK_ONLY_POSTED": 1, "DAY_CLOSED": len(w.engines), "UTILITY_ONLY_REVERSED": 1}
    assert _mis_payments(w)["K-2"].state == "REVERSED" and _mis_payments(w)["K-3"].state == "POSTED"


@given(st.text(alphabet="AZaz09-_ é", min_size=0, max_size=34), st.text(alphabet="0123456789x", min_size=9,
       max_size=11), st.integers(min_value=-1, max_value=1_000_000_001), st.sampled_from(["POSTED", "CANCELLED", "X"]))
@settings(max_examples=400, deadline=None)
def test_hot_path_verdict_agrees_with_validate_record(serial: str, account: str, amount: int, status: str) -> None:
    rec = (1, serial, account, amount, status)
    try:
        recon.validate_record(rec, "r")
        valid = True
    except InvalidField:
        valid = False
    assert recon_staging.record_ok(rec) == valid


def test_a_cancel_in_flight_when_the_day_closes_is_seen_and_a_later_one_refused(world: World) -> None:
    """A cancel that holds its account lock when the reconciliation starts is waited for and its reversal
    counted; the reconciliation never reports a payment that a cancel reversed behind its back."""
    import threading

    w = world
    # with branches: R-1 in branch database 02 (not the front's), R-2 in 03
    a = w.accounts[1:] if w.split else w.accounts
    pay(w, "R-1", a[0], 1_000)
    pay(w, "R-2", a[1], 2_000)
    # A cancel of R-1 is in flight: as payments.cancel does, it holds the bank-day lock (shared) and
    # the account lock, and has seen the day open.
    home = w.ctx.router.engine_for(a[0])
    cancel_conn = home.connect()
    cancel_tx = cancel_conn.begin()
    lock_bank_day(cancel_conn, BANK)
    cancel_conn.execute(sa.select(payments.T_CUST.c.account_no).where(payments.T_CUST.c.account_no == a[0])
                        .with_for_update())
    p = cancel_conn.execute(sa.select(payments.T_PAY).where(payments.T_PAY.c.bank_serial == "R-1")).one()
    results: list[recon.ReconSummary] = []
    records = [(1, "R-1", a[0], 1_000, "POSTED"), (2, "R-2", a[1], 2_000, "POSTED")]

    def reconcile() -> None:
        with recon_branches.reconciliation(w.ctx.router, BANK, business_date(w.clock), rates=w.ctx.rates,
                                           now=w.clock.now()) as r:
            r.load(records)
            results.append(r.close_day())

    t = threading.Thread(target=reconcile)
    if home.dialect.name == "sqlite":
        # One writer: the cancel finishes first, the reconciliation then sees it.
        payments.reverse_payment_in_tx(cancel_conn, p, w.clock.now(), business_date(w.clock), "C-R1")
        cancel_tx.commit()
        t.start()
    else:
        t.start()
        # The reconciliation queues behind the cancel's bank-day lock.
        deadline = dt.datetime.now() + dt.timedelta(seconds=30)
        with home.connect() as watch:
            while not watch.execute(sa.text(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'")).scalar_one():
                assert dt.datetime.now() < deadline, "the reconciliation never waited for the cancel"
                watch.rollback()
                threading.Event().wait(0.05)
        payments.reverse_payment_in_tx(cancel_conn, p, w.clock.now(), business_date(w.clock), "C-R1")
        cancel_tx.commit()
    t.join(timeout=60)
    cancel_conn.close()
    (summary,) = results
    assert summary.total(recon.MISMATCH).count == 1  # reversed in the MIS, posted at the bank
    assert summary.net_settlement_fen == 2_000 == _posted_fen(w)
    assert lines(w)["R-1"].mis_state == "REVERSED"
    # A cancel after the close is refused.
    with pytest.raises(DayClosed):
        cancel(w, "C-R2", "R-2", 2_000)


def test_a_close_the_bank_no_longer_wants_applies_nothing_and_a_rerun_closes_the_day(world: World) -> None:
    """The Reconcile stream asks, just before the close commits, whether the bank still wants it
    (a cancelled stream can end like a finished one: recon_service._still_wanted). Refused there,
    every database is rolled back: no line, no reversal, no BANK_ONLY posting, the day open."""
    from yindian_common.errors import Aborted

    w = world
    pay(w, "W-1", w.accounts[0], 1_000)
    pay(w, "W-2", w.accounts[1], 2_000)  # not in the records: would be reversed
    records = [(1, "W-1", w.accounts[0], 1_000, "POSTED"), (2, "W-3", w.accounts[2], 300, "POSTED")]
    before = snapshot(w)

    def cancelled() -> None:
        raise Aborted("the stream was cancelled", reason="STREAM_CANCELLED")

    with pytest.raises(Aborted), recon_branches.reconciliation(w.ctx.router, BANK, business_date(w.clock),
                                                               rates=w.ctx.rates, now=w.clock.now()) as r:
        r.load(records)
        r.close_day(confirm=cancelled)
    assert changed(before, snapshot(w)) == {}
    assert stored_summary(w) is None and closed_in(w) == []
    summary = run(w, [rec[1:] for rec in records])
    assert not summary.replayed and {t.outcome: t.count for t in summary.totals if t.count} == {
        "MATCHED": 1, "BANK_ONLY": 1, "UTILITY_ONLY": 1}
    assert _mis_payments(w)["W-2"].state == "REVERSED" and _mis_payments(w)["W-3"].state == "POSTED"
