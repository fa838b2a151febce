"""Pay's PostgreSQL fast path (mis_adapter/pay_pg.py) against the rules it
must keep: the bank-day ordering reconciliation relies on, and the rows the
portable path (the Python rule, written statement by statement) writes."""
from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import payments
from mis_adapter.banks import lock_bank_day
from mis_adapter.context import AdapterContext
from mis_adapter.db.core import AllocationRow, BillRow, Customer, Payment, PrepaidEntry
from mis_adapter.db.recon import ReconciledDay
from mis_adapter.payments import CancelCommand, PayCommand
from mis_adapter.settings import AdapterSettings
from tests.support.databases import fresh_database
from tests.support.mis_data import (
    NOON,
    TODAY,
    BillSpec,
    RunningAdapter,
    add_account,
    pay_read_prepared,
    running_adapter,
)
from yindian.v1 import billing_pb2 as pb
from yindian_common.clock import ManualClock
from yindian_common.errors import (
    AccountClosed,
    AccountNotFound,
    DayClosed,
    Precondition,
    SerialConflict,
    Unavailable,
)
from yindian_common.fields import make_account_no
from yindian_common.settings import load_settings

D = dt.date
BILLS = [BillSpec("202608", 10_000, D(2026, 9, 25)), BillSpec("202609", 20_000, D(2026, 10, 25)),
         BillSpec("202610", 15_000, D(2026, 11, 25))]


@pytest.fixture
def pg_adapter(tmp_path: Path) -> Iterator[RunningAdapter]:
    with fresh_database("postgresql", tmp_path) as url, running_adapter(url) as a:
        yield a


def wait_until_a_lock_wait(engine: sa.Engine) -> None:
    with engine.connect() as watch:
        for _ in range(600):
            n = watch.execute(sa.text("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND wait_event_type = 'Lock'")).scalar_one()
            if n:
                return
            watch.rollback()
            threading.Event().wait(0.05)
    raise AssertionError("the pay never waited for the reconciliation")


def test_a_pay_waiting_for_a_day_close_settles_tomorrow(pg_adapter: RunningAdapter) -> None:
    """The pay's read statement starts before the close commits (its snapshot says the day is
    open); it must still see the close, because the write's guard re-reads after the lock."""
    a = pg_adapter
    acct = add_account(a.engine, "01", 1, BILLS)
    recon = a.engine.connect()
    tx = recon.begin()
    lock_bank_day(recon, "ICBC", exclusive=True)
    recon.execute(sa.insert(ReconciledDay.__table__).values(bank_id="ICBC", settlement_date=TODAY,
                                                           reconciled_at=NOON, summary_json="{}"))
    answers: list[pb.PayResponse] = []
    t = threading.Thread(target=lambda: answers.append(a.stub.Pay(pb.PayRequest(
        bank_serial="RACE-1", account_no=acct, amount_fen=5_000, outlet_code="O", teller_id="T",
        channel=pb.CHANNEL_COUNTER), metadata=a.md(), timeout=30)))
    t.start()
    wait_until_a_lock_wait(a.engine)
    tx.commit()
    recon.close()
    t.join(timeout=30)
    (r,) = answers
    assert r.settlement_date == "2026-11-29"
    with a.engine.connect() as conn:
        p = Payment.__table__
        assert conn.execute(sa.select(p.c.settlement_date).where(p.c.bank_serial == "RACE-1")).scalar_one() == \
            D(2026, 11, 29)


def _state(engine: sa.Engine, acct: str) -> tuple[object, ...]:
    b, al, c, pl, p = (BillRow.__table__, AllocationRow.__table__, Customer.__table__, PrepaidEntry.__table__,
                       Payment.__table__)
    with engine.connect() as conn:
        bills = conn.execute(sa.select(b.c.period, b.c.principal_paid_fen, b.c.late_fee_paid_fen, b.c.accrual_micro,
                                       b.c.accrual_date, b.c.status, b.c.paid_on)
                             .where(b.c.account_no == acct).order_by(b.c.period)).all()
        allocs = conn.execute(sa.select(b.c.period, al.c.late_fee_fen, al.c.principal_fen)
                              .join(p, p.c.payment_id == al.c.payment_id).join(b, b.c.bill_id == al.c.bill_id)
                              .where(p.c.account_no == acct).order_by(al.c.allocation_id)).all()
        prepaid = conn.execute(sa.select(c.c.prepaid_fen).where(c.c.account_no == acct)).scalar_one()
        ledger = conn.execute(sa.select(pl.c.delta_fen, pl.c.balance_after_fen).where(pl.c.account_no == acct)
                              .order_by(pl.c.entry_id)).all()
        pays = conn.execute(sa.select(p.c.arrears_after_fen, p.c.prepaid_after_fen,
                                      p.c.prepaid_added_fen, p.c.settlement_date)
                            .where(p.c.account_no == acct).order_by(p.c.payment_id)).all()
    return tuple(map(tuple, bills)), tuple(map(tuple, allocs)), prepaid, tuple(map(tuple, ledger)), \
        tuple(map(tuple, pays))


def test_fast_path_writes_exactly_what_the_portable_rule_writes(tmp_path: Path) -> None:
    """Random payments over random days on twin accounts: the fast statement (SQL computes paid
    amounts, accrual date and paid-on) leaves every row as the portable path does."""
    rng = random.Random(11)
    with fresh_database("postgresql", tmp_path) as url:
        clock = ManualClock(NOON - dt.timedelta(days=60))
        ctxs = {}
        for portable in (False, True):
            ctxs[portable] = AdapterContext.build(
                load_settings(AdapterSettings, {"db": url, "insecure": True, "pay_portable_sql": portable}), clock)
        try:
            from mis_adapter.migrate import upgrade
            from tests.support.mis_data import add_bank
            upgrade(ctxs[False].router.primary)
            add_bank(ctxs[False].router.primary, "ICBC")
            engine = ctxs[False].router.primary
            for case in range(6):
                specs = [BillSpec(f"2026{m:02d}", rng.randrange(1, 30_000), D(2026, m + 1, 20))
                         for m in range(5, 5 + rng.randrange(0, 5))]
                kind = rng.choice(["RESIDENTIAL", "COMMERCIAL"])
                prepaid = rng.choice([0, 0, 500])
                twins = {p: add_account(engine, "01", case * 2 + p + 1, specs, tariff_class=kind,
                                        prepaid_fen=prepaid) for p in (False, True)}
                clock.set(NOON - dt.timedelta(days=60))
                for k in range(rng.randrange(1, 8)):
                    clock.set(clock.now() + dt.timedelta(days=rng.randrange(0, 20)))
                    amount = rng.choice([1, 99, 100, 1_234, 10_000, 25_000, 60_000])
                    for portable, acct in twins.items():
                        payments.pay(ctxs[portable], PayCommand("ICBC", f"S{case}-{k}-{int(portable)}", acct, amount, "O", "T"))
                fast_state, portable_state = _state(engine, twins[False]), _state(engine, twins[True])
                assert fast_state == portable_state, case
        finally:
            for c in ctxs.values():
                c.close()


def test_replays_and_refusals_keep_the_pays_prepared_statements(tmp_path: Path) -> None:
    """A replayed pay and every refusal wrote nothing and end without a ROLLBACK (at which psycopg
    forgets the connection's prepared statements): on the one connection in use, Pay's statements
    stay prepared, the replay answers the stored payment, the refusals change no row, and the next
    pay posts."""
    with fresh_database("postgresql", tmp_path) as url:
        ctx = AdapterContext.build(load_settings(AdapterSettings, {"db": url, "insecure": True, "db_pool_size": 2}),
                                   ManualClock(NOON))
        try:
            from mis_adapter.migrate import upgrade
            from tests.support.mis_data import add_bank
            engine = ctx.router.primary
            upgrade(engine)
            add_bank(engine, "ICBC")
            acct = add_account(engine, "01", 1, BILLS)
            closed = add_account(engine, "01", 2, BILLS, status="CLOSED")


            first = payments.pay(ctx, PayCommand("ICBC", "P-0", acct, 1_000, "O", "T"))
            for k in range(1, 6):
                payments.pay(ctx, PayCommand("ICBC", f"P-{k}", acct, 1_000, "O", "T"))
            assert pay_read_prepared(engine) == 1
            watch = sa.create_engine(url)  # the test's own reads end in ROLLBACK: not on the pays' connection
            before = _state(watch, acct), _state(watch, closed)
            assert payments.pay(ctx, PayCommand("ICBC", "P-0", acct, 1_000, "O", "T")) == first
            with pytest.raises(SerialConflict):
                payments.pay(ctx, PayCommand("ICBC", "P-0", acct, 2_000, "O", "T"))
            with pytest.raises(AccountClosed):
                payments.pay(ctx, PayCommand("ICBC", "P-closed", closed, 1_000, "O", "T"))
            with pytest.raises(AccountNotFound):
                payments.pay(ctx, PayCommand("ICBC", "P-nobody", make_account_no("01", 999), 1_000, "O", "T"))
            assert (_state(watch, acct), _state(watch, closed)) == before
            assert pay_read_prepared(engine) == 1
            after = payments.pay(ctx, PayCommand("ICBC", "P-6", acct, 1_000, "O", "T"))
            assert after.amount_fen == 1_000 and after.payment_id != first.payment_id
            with watch.connect() as conn:
                p = Payment.__table__
                assert conn.execute(sa.select(sa.func.count()).where(p.c.account_no == acct)).scalar_one() == 7
                assert conn.execute(sa.select(sa.func.count()).where(p.c.account_no == closed)).scalar_one() == 0
            watch.dispose()
        finally:
            ctx.close()


def test_refused_cancels_keep_the_pays_prepared_statements(tmp_path: Path) -> None:
    """A Cancel refused after it locked the payment's account (amount mismatch, a reconciled day)
    wrote nothing and ends without a ROLLBACK on the pool the pays share: Pay's statements stay
    prepared on the one connection in use, the refusals change no row, and a later cancel reverses."""
    with fresh_database("postgresql", tmp_path) as url:
        ctx = AdapterContext.build(load_settings(AdapterSettings, {"db": url, "insecure": True, "db_pool_size": 2}),
                                   ManualClock(NOON))
        try:
            from mis_adapter.migrate import upgrade
            from tests.support.mis_data import add_bank
            engine = ctx.router.primary
            upgrade(engine)
            add_bank(engine, "ICBC")
            acct = add_account(engine, "01", 1, BILLS)


            for k in range(6):
                payments.pay(ctx, PayCommand("ICBC", f"P-{k}", acct, 1_000, "O", "T"))
            assert pay_read_prepared(engine) == 1
            watch = sa.create_engine(url)  # the test's own reads end in ROLLBACK: not on the pays' connection
            before = _state(watch, acct)
            with pytest.raises(Precondition) as refused:
                payments.cancel(ctx, CancelCommand("ICBC", "C-1", "P-0", 2_000))
            assert refused.value.reason == "AMOUNT_MISMATCH"
            with watch.begin() as conn:
                conn.execute(sa.insert(ReconciledDay.__table__).values(bank_id="ICBC", settlement_date=TODAY,
                                                                       reconciled_at=NOON, summary_json="{}"))
            with pytest.raises(DayClosed):
                payments.cancel(ctx, CancelCommand("ICBC", "C-2", "P-1", 1_000))
            assert _state(watch, acct) == before
            assert pay_read_prepared(engine) == 1
            with watch.begin() as conn:
                conn.execute(sa.delete(ReconciledDay.__table__))
            assert payments.cancel(ctx, CancelCommand("ICBC", "C-3", "P-2", 1_000)).outcome == "REVERSED"
            with watch.connect() as conn:
                p = Payment.__table__
                states = conn.execute(sa.select(p.c.bank_serial, p.c.state).order_by(p.c.bank_serial)).all()
                assert [tuple(r) for r in states] == [("P-0", "POSTED"), ("P-1", "POSTED"), ("P-2", "REVERSED"),
                                                      ("P-3", "POSTED"), ("P-4", "POSTED"), ("P-5", "POSTED")]
            watch.dispose()
        finally:
            ctx.close()


def test_a_serial_taken_between_read_and_write_is_answered_as_its_owner(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """READ saw the serial free; another account's pay commits it before WRITE+COMMIT is sent. The
    WRITE fails on the unique serial and its COMMIT never runs: nothing of this pay is written, and
    the pay is answered from the stored payment (another account: a serial conflict), not UNAVAILABLE."""
    with fresh_database("postgresql", tmp_path) as url:
        ctx = AdapterContext.build(load_settings(AdapterSettings, {"db": url, "insecure": True, "db_pool_size": 2}),
                                   ManualClock(NOON))
        try:
            from mis_adapter.migrate import upgrade
            from tests.support.mis_data import add_bank
            engine = ctx.router.primary
            upgrade(engine)
            add_bank(engine, "ICBC")
            acct, other = add_account(engine, "01", 1, BILLS), add_account(engine, "01", 2, BILLS)
            for k in range(6):  # the statements are prepared, as under load
                payments.pay(ctx, PayCommand("ICBC", f"P-{k}", acct, 1_000, "O", "T"))
            before = _state(engine, acct)
            other_ctx = AdapterContext.build(load_settings(AdapterSettings, {"db": url, "insecure": True,
                                                                             "db_pool_size": 2}), ManualClock(NOON))
            taken: list[object] = []

            def between_read_and_write(name: str) -> None:
                if name == "mis.before_commit" and not taken:
                    taken.append(name)  # once: the other account's pay passes here too
                    taken.append(payments.pay(other_ctx, PayCommand("ICBC", "RACE", other, 2_000, "O", "T")))

            monkeypatch.setattr(payments, "crash_point", between_read_and_write)
            try:
                with pytest.raises(SerialConflict):
                    payments.pay(ctx, PayCommand("ICBC", "RACE", acct, 1_000, "O", "T"))
            finally:
                other_ctx.close()
            assert len(taken) == 2 and _state(engine, acct) == before
            after = payments.pay(ctx, PayCommand("ICBC", "P-6", acct, 1_000, "O", "T"))
            assert after.amount_fen == 1_000
        finally:
            ctx.close()


def test_a_pay_frozen_between_read_and_write_loses_its_locks_within_the_idle_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pay's process stops after READ (its locks held: the account row, the bank-day lock a
    reconciliation needs). The server ends the transaction at the call's idle bound (its wait bound
    + 1 s) and the locks go; the pay, when it resumes, is UNAVAILABLE and nothing was written.
    (The two-round-trip path: the one-trip function, pay_pg_function, holds no lock between trips.)"""
    from tests.support.waiting import wait_until
    with fresh_database("postgresql", tmp_path) as url:
        ctx = AdapterContext.build(load_settings(AdapterSettings, {"db": url, "insecure": True, "db_pool_size": 2,
                                                                   "pay_pg_function": False}),
                                   ManualClock(NOON))
        watch = sa.create_engine(url)
        try:
            from mis_adapter.migrate import upgrade
            from tests.support.mis_data import add_bank
            engine = ctx.router.primary
            upgrade(engine)
            add_bank(engine, "ICBC")
            acct = add_account(engine, "01", 1, BILLS)
            for k in range(6):  # the statements are prepared, as under load
                payments.pay(ctx, PayCommand("ICBC", f"P-{k}", acct, 1_000, "O", "T"))
            before = _state(watch, acct)

            def holders() -> list[int]:
                with watch.connect() as conn:
                    return list(conn.execute(sa.text(
                        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    )).scalars())

            frozen: list[list[int]] = []

            def freeze(name: str) -> None:  # the process stops here until the server gave up on it
                if name == "mis.before_commit":
                    frozen.append(holders())
                    wait_until(lambda: not holders(), "the server to end the idle transaction", timeout_s=20)

            monkeypatch.setattr(payments, "crash_point", freeze)
            with pytest.raises(Unavailable):
                payments.pay(ctx, PayCommand("ICBC", "FROZEN", acct, 1_000, "O", "T"), time_left_s=0.5)
            assert len(frozen) == 1 and len(frozen[0]) == 1  # it held the bank-day lock while frozen
            assert _state(watch, acct) == before
            monkeypatch.undo()
            assert payments.pay(ctx, PayCommand("ICBC", "AFTER", acct, 1_000, "O", "T")).amount_fen == 1_000
        finally:
            watch.dispose()
            ctx.close()


@pytest.fixture
def pg_ctx(tmp_path: Path) -> Iterator[AdapterContext]:
    with fresh_database("postgresql", tmp_path) as url:
        c = AdapterContext.build(load_settings(AdapterSettings, {"db": url, "insecure": True}), ManualClock(NOON))
        try:
            from mis_adapter.migrate import upgrade
            from tests.support.mis_data import add_bank
            upgrade(c.router.primary)
            add_bank(c.router.primary, "ICBC")
            add_bank(c.router.primary, "ABC")
            yield c
        finally:
            c.close()


_pay_serials = iter(range(1, 10**9))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(closed=st.sets(st.integers(-2, 3)), others_closed=st.sets(st.integers(-1, 2)), suspended=st.booleans(),
       signed_off=st.sampled_from([None, -1, 0, 1]), link_state=st.sampled_from(["SIGNED_OFF", "SIGNED_ON"]))
def test_the_pays_bank_state_is_the_python_rule_of_the_rows(
        pg_ctx: AdapterContext, closed: set[int], others_closed: set[int], suspended: bool, signed_off: int | None,
        link_state: str) -> None:
    """READ and WRITE's guard restate in SQL which of the bank's days are reconciled (one range scan,
    pay_pg.RECONCILED_DAYS), whether it is suspended and whether it signed off. Over random reconciled
    days of this bank and another, suspension and link states, a pay answers what the Python rules
    (allocation.settlement_date, link_state.signed_off_for) say of the same rows: settled today or
    tomorrow, DayClosed, or BankSuspended. A guard that disagreed with READ would never write (the
    pay would end in RETRY)."""
    from mis_adapter.allocation import settlement_date
    from mis_adapter.db.core import Bank
    from mis_adapter.db.link import BankLink
    from mis_adapter.link_state import signed_off_for
    from yindian_common.errors import BankSuspended
    engine = pg_ctx.router.primary
    rd, links, banks = ReconciledDay.__table__, BankLink.__table__, Bank.__table__
    with engine.begin() as conn:
        conn.execute(sa.delete(rd))
        conn.execute(sa.delete(links))
        rows = [{"bank_id": b, "settlement_date": TODAY + dt.timedelta(days=d), "reconciled_at": NOON,
                 "summary_json": "{}"} for b, ds in (("ICBC", closed), ("ABC", others_closed)) for d in ds]
        if rows:
            conn.execute(sa.insert(rd), rows)
        if signed_off is not None:
            conn.execute(sa.insert(links).values(bank_id="ICBC", state=link_state,
                                                 business_date=TODAY + dt.timedelta(days=signed_off),
                                                 changed_at=NOON, refund_mode="PREPAID"))
        conn.execute(sa.update(banks).where(banks.c.bank_id == "ICBC").values(suspended=suspended,
                                                                              suspended_reason="strike"))
    acct = add_account(engine, "01", next(_pay_serials), BILLS)
    cmd = PayCommand("ICBC", f"PROP-{acct}", acct, 5_000, "O", "T")
    try:
        expected: object = settlement_date(
            TODAY, today_reconciled=0 in closed, next_reconciled=1 in closed,
            signed_off=signed_off is not None and signed_off_for(link_state, TODAY + dt.timedelta(days=signed_off),
                                                                 TODAY))
    except DayClosed:
        expected = DayClosed
    if suspended:
        expected = BankSuspended
    try:
        got: object = payments.pay(pg_ctx, cmd).settlement_date
    except (DayClosed, BankSuspended) as exc:
        got = type(exc)
    assert got == expected


def test_pays_waiting_for_the_account_see_its_newest_balance(pg_ctx: AdapterContext) -> None:
    """WRITE's guard does not re-check the account row: a pay that waited for the account lock reads
    the row at its newest version (READ locks it FOR UPDATE). 24 concurrent over-pays of one account:
    each payment's prepaid_after and ledger line continue exactly from the one before (a pay that
    computed from a balance older than the previous commit would break the chain), and the last is
    the account's balance."""
    engine = pg_ctx.router.primary
    acct = add_account(engine, "01", 900_001, BILLS[:1])
    amounts = [3_000 + 101 * i for i in range(24)]
    barrier = threading.Barrier(len(amounts))
    errors: list[Exception] = []

    def one(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            payments.pay(pg_ctx, PayCommand("ICBC", f"BAL-{i}", acct, amounts[i], "O", "T"))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(amounts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    p, pl, c = Payment.__table__, PrepaidEntry.__table__, Customer.__table__
    with engine.connect() as conn:
        pays = conn.execute(sa.select(p.c.prepaid_added_fen, p.c.prepaid_after_fen).where(p.c.account_no == acct)
                            .order_by(p.c.payment_id)).all()
        ledger = conn.execute(sa.select(pl.c.delta_fen, pl.c.balance_after_fen).where(pl.c.account_no == acct)
                              .order_by(pl.c.entry_id)).all()
        balance = conn.execute(sa.select(c.c.prepaid_fen).where(c.c.account_no == acct)).scalar_one()
    running = 0
    for added, after in pays:
        running += added
        assert after == running
    assert [(d, a) for d, a in ledger] == [(added, after) for added, after in pays if added]
    assert balance == running > sum(amounts) - BILLS[0].amount_fen - 5_000
