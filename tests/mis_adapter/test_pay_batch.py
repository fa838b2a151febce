"""Several pays in one call and one commit on PostgreSQL (yd_pay_many, mis_adapter.pay_batch).

What a user would notice if batching went wrong: a pay answered or written differently than if it had
come alone (another allocation, a replay answered from the wrong payment, a refusal that wrote
something); a pay failed, or posted, because of another pay in its batch; two batches deadlocking; a
pay held in the queue past its deadline; a posted pay whose commit did not wait for its WAL flush."""
from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import pay_batch, pay_pg, payments
from mis_adapter.banks import bank_day_key
from mis_adapter.context import AdapterContext
from mis_adapter.db.core import BillRow, Customer, Payment
from mis_adapter.payments import PayCommand, PayResult
from mis_adapter.settings import AdapterSettings
from tests.mis_adapter.test_pay_function import _bill, _op, _rows, _set_bank
from tests.support.databases import fresh_database
from tests.support.mis_data import SHANGHAI, BillSpec, add_account, add_bank
from tests.support.waiting import wait_until
from yindian_common.clock import ManualClock, business_date, utc_now
from yindian_common.errors import Unavailable, YinDianError
from yindian_common.fields import make_account_no
from yindian_common.settings import load_settings

START = dt.datetime(2025, 11, 3, 10, 0, tzinfo=SHANGHAI)
BANK = "ICBC"
NO_SUCH_ACCOUNT = make_account_no("01", 9_999_999)
_serials = itertools.count(1)
_accounts = itertools.count(1)


@pytest.fixture(scope="module")
def books(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AdapterContext, ManualClock]]:
    """A migrated database and a context whose pays form batches deterministically: one place per database
    (pay_batch_callers 1), so a pay arriving while another is in progress queues for the next batch."""
    with fresh_database("postgresql", tmp_path_factory.mktemp("paybatch"), schema="mis") as url:
        clock = ManualClock(START)
        ctx = AdapterContext.build(load_settings(AdapterSettings, {"db": url, "insecure": True, "db_pool_size": 6,
                                                                   "pay_batch_max": 16, "pay_batch_callers": 1}),
                                    clock)
        try:
            add_bank(ctx.router.primary, BANK)
            yield ctx, clock
        finally:
            ctx.close()


@contextmanager
def _kept(ctx: AdapterContext) -> Iterator[pay_pg.KeptConnection]:
    pool = pay_pg.kept_connections(ctx.router.primary)
    assert pool is not None
    kept = pool.take()
    assert kept is not None
    try:
        yield kept
    finally:
        pool.give_back(kept)


def _reset(ctx: AdapterContext, clock: ManualClock) -> None:
    """The module's database is shared: the property test may have left the bank suspended or its day closed."""
    clock.set(START)
    _set_bank(ctx.router.primary, START.date(), frozenset(), False, False, START)


# ---- a batch against the same pays one by one ----
def _normalised(got: pay_pg.PayCalled, payment_of: dict[int, int], period_of: dict[int, str]) -> tuple[Any, ...]:
    """yd_pay's answer with the payment named by the index of the pay that posted it, bills by period."""
    allocs = tuple((period_of[b], f, p) for b, f, p in got.allocations())
    return (got.code, payment_of.get(got.payment_id) if got.payment_id is not None else None, got.branch_code,
            got.settlement, got.arrears_after, got.prepaid_after, got.refusal, allocs)


def _answers(engine: sa.Engine, got: list[pay_pg.PayCalled]) -> list[tuple[Any, ...]]:
    payment_of = {a.payment_id: i for i, a in enumerate(got) if a.code == "POSTED"}
    with engine.connect() as conn:
        period_of = dict(conn.execute(sa.select(BillRow.__table__.c.bill_id, BillRow.__table__.c.period)).all())
    return [_normalised(a, payment_of, period_of) for a in got]  # type: ignore[arg-type]


_account = st.fixed_dictionaries({
    "bills": st.lists(_bill, max_size=3, unique_by=lambda b: b[0]),
    "tariff": st.sampled_from(["RESIDENTIAL", "COMMERCIAL"]),
    "prepaid": st.sampled_from([0, 0, 700]),
    "status": st.sampled_from(["OPEN"] * 6 + ["CLOSED"]),
})
_pay = st.fixed_dictionaries({
    "account": st.integers(0, 3),  # the last: an account that does not exist
    "amount": st.one_of(st.integers(1, 200), st.integers(1, 80_000)),
    "kind": st.sampled_from(["pay", "pay", "pay", "replay", "conflict"]),
})


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accounts=st.lists(_account, min_size=3, max_size=3), bank=_op, pays=st.lists(_pay, min_size=2, max_size=9))
def test_a_batch_answers_and_writes_as_its_pays_one_by_one_in_its_order(
        books: tuple[AdapterContext, ManualClock], accounts: list[dict[str, Any]], bank: dict[str, Any],
        pays: list[dict[str, Any]]) -> None:
    """Twin accounts: one set paid by one yd_pay_many call, the other by the same pays through yd_pay one
    after another, in the batch's order (by account number, arrival order within one account). Equal answers
    (posts, refusals, replays and serial conflicts, with the payment they name) and equal rows."""
    ctx, clock = books
    engine = ctx.router.primary
    clock.set(START + dt.timedelta(days=int(bank["days"])))
    day, now = business_date(clock), utc_now(clock)
    _set_bank(engine, day, bank["reconciled"], bool(bank["signed_off"]), bool(bank["suspended"]), clock.now())
    twins: list[list[str]] = [[], []]
    for twin in (0, 1):
        for spec in accounts:
            bills = [BillSpec(p, amount, dt.date(int(p[:4]) + (p[4:] == "12"), int(p[4:]) % 12 + 1, 20))
                     for p, amount in spec["bills"]]
            twins[twin].append(add_account(engine, "01", next(_accounts), bills, tariff_class=spec["tariff"],
                                           prepaid_fen=spec["prepaid"], status=spec["status"]))
        twins[twin].append(make_account_no("01", next(_accounts)))  # never a customer: NOT_FOUND
    cmds: list[list[PayCommand]] = [[], []]
    for i, p in enumerate(pays):
        for twin in (0, 1):
            cmd = PayCommand(BANK, f"B{twin}-{next(_serials)}", twins[twin][p["account"]], p["amount"], "O", "T")
            if p["kind"] != "pay" and i:
                earlier = cmds[twin][i // 2]
                cmd = earlier if p["kind"] == "replay" else PayCommand(BANK, earlier.bank_serial, cmd.account_no,
                                                                       cmd.amount_fen, "O", "T")
            cmds[twin].append(cmd)
    key = bank_day_key(BANK)
    with _kept(ctx) as kept:
        batched = pay_pg.call_kept_many(kept, [pay_pg.BatchPay(c, day, key, now) for c in cmds[0]], wait_ms=10_000,
                                        rates=ctx.rates)
        alone: list[pay_pg.PayCalled | None] = [None] * len(pays)
        for i in sorted(range(len(pays)), key=lambda i: (cmds[0][i].account_no, i)):
            alone[i] = pay_pg.call_kept(kept, cmd=cmds[1][i], day=day, day_key=key, now=now, wait_ms=10_000,
                                        rates=ctx.rates)
    assert _answers(engine, batched) == _answers(engine, alone)  # type: ignore[arg-type]
    for a, b in zip(twins[0][:3], twins[1][:3], strict=True):
        assert _rows(engine, a) == _rows(engine, b)


def test_a_batch_with_a_post_commits_with_its_wal_flush_even_after_a_refusal(
        books: tuple[AdapterContext, ManualClock]) -> None:
    """yd_pay turns synchronous_commit off for a transaction that wrote nothing; in a batch the transaction is
    shared, so a post after a refusal must turn it back on (else a crash could lose a posted, answered pay)."""
    ctx, clock = books
    _reset(ctx, clock)
    engine = ctx.router.primary
    closed = add_account(engine, "01", next(_accounts), status="CLOSED")  # first in the batch's account order
    acct = add_account(engine, "01", next(_accounts), [BillSpec("202510", 5_000, dt.date(2025, 11, 20))])
    day, now, key = business_date(clock), utc_now(clock), bank_day_key(BANK)
    refused = PayCommand(BANK, f"R-{next(_serials)}", closed, 100, "O", "T")
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()

        def setting_after(cmds: list[PayCommand]) -> tuple[list[str], str]:
            params = pay_pg.pay_many_params([pay_pg.BatchPay(c, day, key, now) for c in cmds], ctx.rates, "utf-8")
            cur.execute(_psycopg_sql(pay_pg.PAY_MANY_CALL), [p.decode() for p in params])
            codes = [r[1] for r in cur.fetchall()]  # in the order they ran
            cur.execute("SELECT current_setting('synchronous_commit')")
            (setting,) = cur.fetchone()
            raw.rollback()
            return codes, setting

        assert setting_after([refused, refused]) == (["CLOSED", "CLOSED"], "off")
        assert setting_after([refused, PayCommand(BANK, f"P-{next(_serials)}", acct, 100, "O", "T")]) \
            == (["CLOSED", "POSTED"], "on")
    finally:
        raw.close()


def _psycopg_sql(sql: str) -> str:
    """PostgreSQL's $n placeholders as psycopg's %s (for a plain cursor in a transaction)."""
    for n in range(15, 0, -1):
        sql = sql.replace(f"${n}::", "%s::")
    return sql


def test_two_batches_lock_accounts_in_one_order_and_do_not_deadlock(books: tuple[AdapterContext, ManualClock]) -> None:
    """Batches [B, C, A] and [A, D, B] while C and D are held elsewhere: in arrival order the first would hold
    B and wait for A, the second hold A and wait for B (a deadlock, one batch failing). In account order both
    post every pay."""
    ctx, clock = books
    _reset(ctx, clock)
    engine = ctx.router.primary
    a, b, c, d = (add_account(engine, "01", next(_accounts)) for _ in range(4))
    day, now, key = business_date(clock), utc_now(clock), bank_day_key(BANK)
    pool = pay_pg.kept_connections(engine)
    assert pool is not None
    results: dict[int, Any] = {}

    def batch(n: int, accts: tuple[str, ...]) -> None:
        kept = pool.take()
        assert kept is not None
        try:
            results[n] = [g.code for g in pay_pg.call_kept_many(
                kept, [pay_pg.BatchPay(PayCommand(BANK, f"L{n}-{next(_serials)}", x, 100, "O", "T"), day, key, now)
                       for x in accts], wait_ms=20_000, rates=ctx.rates)]
            pool.give_back(kept)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results[n] = exc
            pool.discard(kept)

    with _accounts_locked(engine, c, d):
        threads = [threading.Thread(target=batch, args=(1, (b, c, a))), threading.Thread(target=batch, args=(2, (a, d, b)))]
        for t in threads:
            t.start()
        wait_until(lambda: _lock_waits(engine) >= 2, "both batches to wait on a lock")
    for t in threads:
        t.join(timeout=30)
    assert results == {1: ["POSTED"] * 3, 2: ["POSTED"] * 3}


def test_a_batch_takes_every_bank_day_lock_before_any_account(books: tuple[AdapterContext, ManualClock]) -> None:
    """A reconciliation of ICBC's day holds its bank-day lock exclusive and then locks accounts. A batch of
    ABC's pay on account A and ICBC's pay on B waits for ICBC's bank-day lock holding no account, so the
    reconciliation gets A; had the batch locked A first (ABC's pay) it would deadlock with it."""
    ctx, clock = books
    _reset(ctx, clock)
    engine = ctx.router.primary
    with engine.connect() as conn:
        if conn.execute(sa.text("SELECT count(*) FROM banks WHERE bank_id = 'ABC'")).scalar_one() == 0:
            add_bank(engine, "ABC")
    a, b = add_account(engine, "01", next(_accounts)), add_account(engine, "01", next(_accounts))
    day, now = business_date(clock), utc_now(clock)
    pays = [pay_pg.BatchPay(PayCommand("ABC", f"O-{next(_serials)}", a, 100, "O", "T"), day, bank_day_key("ABC"), now),
            pay_pg.BatchPay(PayCommand(BANK, f"O-{next(_serials)}", b, 100, "O", "T"), day, bank_day_key(BANK), now)]
    results: list[Any] = []

    def batch() -> None:
        with _kept(ctx) as kept:
            try:
                results.append([g.code for g in pay_pg.call_kept_many(kept, pays, wait_ms=20_000, rates=ctx.rates)])
            except pay_pg.BatchFailed as exc:
                results.append(exc)

    recon_engine = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    try:
        with recon_engine.connect() as recon:
            recon.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": bank_day_key(BANK)})
            t = threading.Thread(target=batch)
            t.start()
            wait_until(lambda: _lock_waits(engine, "%yd_pay_many%") == 1, "the batch to wait for ICBC's day")
            recon.execute(sa.text("SET LOCAL lock_timeout = '20s'"))
            locked = recon.execute(sa.text("SELECT account_no FROM customers WHERE account_no = :a FOR UPDATE"),
                                   {"a": a}).scalar_one()
            recon.commit()
    finally:
        recon_engine.dispose()
    t.join(timeout=30)
    assert locked == a
    assert results == [["POSTED", "POSTED"]]


# ---- through Pay: batches formed by the batcher ----
@contextmanager
def _accounts_locked(engine: sa.Engine, *accts: str) -> Iterator[Callable[[], None]]:
    """A transaction holding the accounts' row locks as a pay would; yields its release (also at the end)."""
    customers = Customer.__table__
    holder_engine = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    try:
        with holder_engine.connect() as holder:
            holder.begin()
            holder.execute(sa.select(customers.c.account_no).where(customers.c.account_no.in_(accts))
                           .with_for_update())
            yield holder.rollback
            holder.rollback()
    finally:
        holder_engine.dispose()


def _lock_waits(engine: sa.Engine, like: str = "%") -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                        "AND wait_event_type = 'Lock' AND query LIKE :q"), {"q": like}).scalar_one())


class _Payer:
    """A pay on a thread of its own; `answer` its PayResult or the error it raised."""

    def __init__(self, ctx: AdapterContext, cmd: PayCommand, time_left_s: float | None = None) -> None:
        self.cmd = cmd
        self.answer: PayResult | Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(ctx, time_left_s))
        self.thread.start()

    def _run(self, ctx: AdapterContext, time_left_s: float | None) -> None:
        try:
            self.answer = payments.pay(ctx, self.cmd, time_left_s=time_left_s)
        except Exception as exc:  # noqa: BLE001 - asserted by the tests
            self.answer = exc

    def result(self) -> PayResult | Exception | None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        return self.answer


def _batcher(ctx: AdapterContext) -> pay_batch.PayBatcher:
    engine = ctx.router.primary
    kept = pay_pg.kept_connections(engine)
    assert kept is not None
    return pay_batch.batcher_of(engine, kept, callers_max=1, batch_max=16)


@contextmanager
def _queued_behind_a_held_pay(ctx: AdapterContext, cmds: list[tuple[PayCommand, float | None]]
                              ) -> Iterator[list[_Payer]]:
    """Pays `cmds` queued while the one place is taken by a pay waiting on a locked account; yields them
    queued; the held pay's account is released on leaving, and the queued pays go as one batch."""
    engine = ctx.router.primary
    held = add_account(engine, "01", next(_accounts))
    with _accounts_locked(engine, held):
        first = _Payer(ctx, PayCommand(BANK, f"H-{next(_serials)}", held, 100, "O", "T"))
        wait_until(lambda: _lock_waits(engine, "%yd_pay%") == 1, "the first pay to wait on its account")
        payers = []
        for cmd, left in cmds:
            payers.append(_Payer(ctx, cmd, left))
            wait_until(lambda: _batcher(ctx).waiting == len(payers), "the pay to queue")
        yield payers
    assert isinstance(first.result(), PayResult)


def _payments(engine: sa.Engine, serials: list[str]) -> list[tuple[str, int, str, str]]:
    """(serial, amount, state, transaction) of the payments with those serials, in serial order."""
    p = Payment.__table__
    with engine.connect() as conn:
        return [(r[0], r[1], r[2], str(r[3])) for r in conn.execute(
            sa.select(p.c.bank_serial, p.c.amount_fen, p.c.state, sa.literal_column("payments.xmin"))
            .where(p.c.bank_serial.in_(serials)).order_by(p.c.bank_serial))]


def test_queued_pays_post_in_one_commit_and_a_replay_in_the_batch_answers_the_stored_payment(
        books: tuple[AdapterContext, ManualClock]) -> None:
    ctx, clock = books
    _reset(ctx, clock)
    engine = ctx.router.primary
    a, b = (add_account(engine, "01", next(_accounts), [BillSpec("202510", 5_000, dt.date(2025, 11, 20))])
            for _ in range(2))
    s = next(_serials)
    first, again = PayCommand(BANK, f"Q{s}-1", a, 3_000, "O", "T"), PayCommand(BANK, f"Q{s}-2", b, 7_000, "O", "T")
    unknown = PayCommand(BANK, f"Q{s}-3", NO_SUCH_ACCOUNT, 1_000, "O", "T")
    with _queued_behind_a_held_pay(ctx, [(first, None), (again, None), (first, None), (unknown, None)]) as payers:
        pass
    got = [p.result() for p in payers]
    assert isinstance(got[0], PayResult) and isinstance(got[1], PayResult)
    assert got[2] == got[0]  # the replay: the stored payment, as a second pay alone would answer
    assert isinstance(got[3], YinDianError) and type(got[3]).__name__ == "AccountNotFound"
    assert got[0].allocations[0].principal_fen == 3_000 and got[1].prepaid_after_fen == 2_000
    rows = _payments(engine, [first.bank_serial, again.bank_serial, unknown.bank_serial])
    assert [r[:3] for r in rows] == [(first.bank_serial, 3_000, "POSTED"), (again.bank_serial, 7_000, "POSTED")]
    assert rows[0][3] == rows[1][3]  # one transaction: the batch's


def test_a_bill_changed_under_a_batch_rolls_it_back_and_each_pay_posts_alone(
        books: tuple[AdapterContext, ManualClock]) -> None:
    """A writer without the account lock settles B's bill, uncommitted, while a batch of A's and B's pays
    prices it: B's write waits, then finds the bill changed (BILL_CHANGED) and the whole batch rolls back.
    Each pay is then called alone: A posts to its bill, B's money goes to prepaid credit, never paying the
    bill twice, and neither pay is failed for the other's sake."""
    ctx, clock = books
    _reset(ctx, clock)
    engine = ctx.router.primary
    a, b = (add_account(engine, "01", next(_accounts), [BillSpec("202510", 5_000, dt.date(2025, 11, 20))])
            for _ in range(2))
    bills = BillRow.__table__
    with engine.connect() as conn:
        b_bill = conn.execute(sa.select(bills.c.bill_id).where(bills.c.account_no == b)).scalar_one()
    s = next(_serials)
    pay_a, pay_b = PayCommand(BANK, f"G{s}-A", a, 5_000, "O", "T"), PayCommand(BANK, f"G{s}-B", b, 5_000, "O", "T")
    other_engine = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    try:
        with other_engine.connect() as other:
            other.execute(sa.update(bills).where(bills.c.bill_id == b_bill)
                          .values(principal_paid_fen=5_000, status="PAID", paid_on=START.date()))
            with _queued_behind_a_held_pay(ctx, [(pay_a, None), (pay_b, None)]) as payers:
                pass
            wait_until(lambda: _lock_waits(engine, "%yd_pay_many%") == 1, "the batch to wait on B's bill")
            other.commit()
    finally:
        other_engine.dispose()
    got_a, got_b = (p.result() for p in payers)
    assert isinstance(got_a, PayResult) and got_a.allocations[0].principal_fen == 5_000
    assert isinstance(got_b, PayResult) and got_b.allocations == () and got_b.prepaid_after_fen == 5_000
    with engine.connect() as conn:
        assert conn.execute(sa.select(bills.c.principal_paid_fen, bills.c.status)
                            .where(bills.c.bill_id == b_bill)).one() == (5_000, "PAID")
    rows = _payments(engine, [pay_a.bank_serial, pay_b.bank_serial])
    assert [r[:3] for r in rows] == [(pay_a.bank_serial, 5_000, "POSTED"), (pay_b.bank_serial, 5_000, "POSTED")]
    assert rows[0][3] != rows[1][3]  # each alone, after the batch rolled back


def test_a_lock_held_past_a_batchs_bound_fails_only_the_pay_that_waits_for_it(
        books: tuple[AdapterContext, ManualClock]) -> None:
    """One pay of a batch waits on an account held elsewhere for longer than its deadline: the batch gives up
    at half the shortest deadline, and each pay is called alone with the rest of its own: the other posts,
    the held one answers UNAVAILABLE at its deadline, with nothing written."""
    ctx, clock = books
    _reset(ctx, clock)
    engine = ctx.router.primary
    free, held = add_account(engine, "01", next(_accounts)), add_account(engine, "01", next(_accounts))
    s = next(_serials)
    pay_free, pay_held = (PayCommand(BANK, f"T{s}-F", free, 500, "O", "T"),
                          PayCommand(BANK, f"T{s}-H", held, 600, "O", "T"))
    with _accounts_locked(engine, held):
        with _queued_behind_a_held_pay(ctx, [(pay_held, 3.0), (pay_free, 3.0)]) as payers:
            pass
        got_held, got_free = (p.result() for p in payers)
    assert isinstance(got_free, PayResult) and got_free.amount_fen == 500
    assert isinstance(got_held, Unavailable) and got_held.reason == "DB_TIMEOUT"
    assert [r[:3] for r in _payments(engine, [pay_free.bank_serial, pay_held.bank_serial])] \
        == [(pay_free.bank_serial, 500, "POSTED")]


def test_a_batch_whose_backend_is_terminated_answers_each_pay_in_doubt_and_the_next_pays_post(
        books: tuple[AdapterContext, ManualClock]) -> None:
    """The server ends the batch's connection while the batch waits on a lock: every pay of it answers
    UNAVAILABLE COMMIT_IN_DOUBT (the call was sent), never UNKNOWN; here nothing was written, and the same
    serials post when sent again."""
    ctx, clock = books
    _reset(ctx, clock)
    engine = ctx.router.primary
    free, held = add_account(engine, "01", next(_accounts)), add_account(engine, "01", next(_accounts))
    s = next(_serials)
    cmds = [PayCommand(BANK, f"K{s}-F", free, 500, "O", "T"), PayCommand(BANK, f"K{s}-H", held, 600, "O", "T")]
    with _accounts_locked(engine, held):
        with _queued_behind_a_held_pay(ctx, [(c, None) for c in cmds]) as payers:
            pass
        wait_until(lambda: _lock_waits(engine, "%yd_pay_many%") == 1, "the batch to wait on the held account")
        with engine.connect() as conn:
            assert conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%yd_pay_many%'")).scalar_one()
        got = [p.result() for p in payers]
    assert all(isinstance(g, Unavailable) and g.reason == "COMMIT_IN_DOUBT" for g in got), got
    assert _payments(engine, [c.bank_serial for c in cmds]) == []
    assert [payments.pay(ctx, c).amount_fen for c in cmds] == [500, 600]


def test_a_pay_queued_past_its_deadline_leaves_the_queue_unwritten(books: tuple[AdapterContext, ManualClock]) -> None:
    ctx, clock = books
    _reset(ctx, clock)
    engine = ctx.router.primary
    acct = add_account(engine, "01", next(_accounts))
    late = PayCommand(BANK, f"D{next(_serials)}", acct, 500, "O", "T")
    with _queued_behind_a_held_pay(ctx, [(late, 0.6)]) as payers:
        got = payers[0].result()  # while the place is still held
        assert _batcher(ctx).waiting == 0
    assert isinstance(got, Unavailable) and got.reason == "DEADLINE_PASSED"
    assert _payments(engine, [late.bank_serial]) == []
    assert payments.pay(ctx, late).amount_fen == 500


def test_the_migration_adds_yd_pay_many_and_its_downgrade_removes_it(tmp_path: Any) -> None:
    from mis_adapter.migrate import downgrade, upgrade
    with fresh_database("postgresql", tmp_path, schema="mis") as url:
        engine = sa.create_engine(url)
        try:
            def defined() -> list[str]:
                with engine.connect() as conn:
                    return sorted(conn.execute(sa.text("SELECT proname FROM pg_proc WHERE proname LIKE 'yd_pay%'"))
                                  .scalars())
            assert defined() == ["yd_pay", "yd_pay_many"]
            downgrade(engine, "0004_paybatch_pay_many@-1")
            assert defined() == ["yd_pay"]
            upgrade(engine)
            assert defined() == ["yd_pay", "yd_pay_many"]
        finally:
            engine.dispose()
