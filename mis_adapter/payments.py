"""The money-moving transactions of BillingService over SQLAlchemy Core:
Pay, Cancel, GetPayment and QueryAccount (DESIGN.md Money semantics 1, 2,
4, 5, 6 and 9). Statements are built once at import; each Pay is one
transaction that locks the account row first, so concurrent payments on an
account serialize. The rules themselves live in allocation.py and
late_fee.py; this module only reads rows, applies them and writes rows.

Must never: write anything for a refused request, apply a (bank, serial)
twice, or let allocations + prepaid differ from the payment."""
from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from mis_adapter import pay_batch, pay_pg
from mis_adapter.allocation import Allocation, AllocationPlan, bill_status, bills_due, settlement_date
from mis_adapter.banks import bank_day_key, lock_bank_day
from mis_adapter.db.base import table_of
from mis_adapter.db.core import (
    AllocationRow,
    BillRow,
    CancelRow,
    Customer,
    JournalEntry,
    Payment,
    PrepaidEntry,
)
from mis_adapter.db.recon import ReconciledDay
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.link_state import SIGNED_OFF_TODAY
from mis_adapter.pay_plan import PaymentEffects, payment_effects
from mis_adapter.routing import BranchRouter
from yindian_common import business_metrics, db_watch
from yindian_common.clock import Clock, business_date, utc_now
from yindian_common.crash_points import crash_point
from yindian_common.db import WaitBound, answer_due, bound_waits, db_wait_bound
from yindian_common.db_errors import commit_or_doubt
from yindian_common.db_errors import db_call as _db_call
from yindian_common.errors import (
    AccountClosed,
    AccountNotFound,
    BankSuspended,
    DayClosed,
    Precondition,
    SerialConflict,
    SerialReversed,
    Unavailable,
    YinDianError,
)
from yindian_common.fields import mask_name

T_CUST = table_of(Customer)
T_BILL = table_of(BillRow)
T_PAY = table_of(Payment)
T_ALLOC = table_of(AllocationRow)
T_PREPAID = table_of(PrepaidEntry)
T_CANCEL = table_of(CancelRow)
T_JOURNAL = table_of(JournalEntry)
T_RECON = table_of(ReconciledDay)

POSTED, REVERSED, TOMBSTONE = "POSTED", "REVERSED", "TOMBSTONE"
ONE_DAY = dt.timedelta(days=1)
CHANNELS = ("COUNTER", "AUTO_DEBIT", "ATM", "ONLINE")

# ---- statements, built once ----
_b = sa.bindparam
_LOCK_CUSTOMER = (sa.select(T_CUST.c.branch_code, T_CUST.c.tariff_class, T_CUST.c.status, T_CUST.c.prepaid_fen)
                  .where(T_CUST.c.account_no == _b("account_no")).with_for_update())
_READ_CUSTOMER = sa.select(T_CUST.c.branch_code, T_CUST.c.tariff_class, T_CUST.c.status, T_CUST.c.prepaid_fen,
                           T_CUST.c.name).where(T_CUST.c.account_no == _b("account_no"))
_CLOSED_ON = sa.exists(sa.select(T_RECON.c.bank_id).where(T_RECON.c.bank_id == _b("bank_id"),
                                                         T_RECON.c.settlement_date == _b("day")))
_CLOSED_NEXT = sa.exists(sa.select(T_RECON.c.bank_id).where(T_RECON.c.bank_id == _b("bank_id"),
                                                           T_RECON.c.settlement_date == _b("next_day")))
# A pay's first account statement: lock the account, and learn (after the bank-day lock) whether
# today is already reconciled for this bank, in which case the payment settles tomorrow.
_SERIAL_TAKEN = (sa.select(T_PAY.c.payment_id)
                 .where(T_PAY.c.bank_id == _b("bank_id"), T_PAY.c.bank_serial == _b("serial")).scalar_subquery())
_LOCK_CUSTOMER_FOR_PAY = (sa.select(T_CUST.c.branch_code, T_CUST.c.tariff_class, T_CUST.c.status,
                                    T_CUST.c.prepaid_fen, _CLOSED_ON.label("closed_today"),
                                    _CLOSED_NEXT.label("closed_next"), _SERIAL_TAKEN.label("taken_id"),
                                    SIGNED_OFF_TODAY.label("signed_off"))
                          .where(T_CUST.c.account_no == _b("account_no")).with_for_update())
_PAYMENT_BY_ID = sa.select(T_PAY).where(T_PAY.c.payment_id == _b("p_id"))
_PAYMENT_BY_SERIAL = sa.select(T_PAY).where(T_PAY.c.bank_id == _b("bank_id"), T_PAY.c.bank_serial == _b("serial"))
_UNPAID_BILLS = (sa.select(T_BILL.c.bill_id, T_BILL.c.period, T_BILL.c.kwh, T_BILL.c.amount_fen,
                           T_BILL.c.prepaid_applied_fen, T_BILL.c.principal_paid_fen, T_BILL.c.late_fee_paid_fen,
                           T_BILL.c.accrual_micro, T_BILL.c.accrual_date, T_BILL.c.due_date, T_BILL.c.status)
                 .where(T_BILL.c.account_no == _b("account_no"), T_BILL.c.status != "PAID")
                 .order_by(T_BILL.c.period, T_BILL.c.bill_id))
_INSERT_PAYMENT = T_PAY.insert()
_INSERT_ALLOC = T_ALLOC.insert()
_UPDATE_BILL = (T_BILL.update().where(T_BILL.c.bill_id == _b("b_id"))
                .values(principal_paid_fen=_b("principal_paid"), late_fee_paid_fen=_b("fee_paid"),
                        accrual_micro=_b("micro"), accrual_date=_b("micro_date"), status=_b("new_status"),
                        paid_on=_b("new_paid_on")))
_ADD_PREPAID = (T_CUST.update().where(T_CUST.c.account_no == _b("acct"))
                .values(prepaid_fen=T_CUST.c.prepaid_fen + _b("delta")))
_INSERT_PREPAID = T_PREPAID.insert()
_INSERT_JOURNAL = T_JOURNAL.insert()
_ALLOCS_OF = (sa.select(T_ALLOC.c.bill_id, T_ALLOC.c.late_fee_fen, T_ALLOC.c.principal_fen)
              .where(T_ALLOC.c.payment_id == _b("payment_id")).order_by(T_ALLOC.c.allocation_id))
_CANCEL_BY_SERIAL = sa.select(T_CANCEL).where(T_CANCEL.c.bank_id == _b("bank_id"),
                                              T_CANCEL.c.cancel_serial == _b("serial"))
_INSERT_CANCEL = T_CANCEL.insert()
_DAY_CLOSED = sa.select(T_RECON.c.bank_id).where(T_RECON.c.bank_id == _b("bank_id"),
                                                 T_RECON.c.settlement_date == _b("day"))
_REVERSE_PAYMENT = (T_PAY.update().where(T_PAY.c.payment_id == _b("p_id"), T_PAY.c.state == POSTED)
                    .values(state=REVERSED, reversed_at=_b("at"), reversed_on=_b("day"),
                            cancel_serial=_b("c_serial")))
_BILLS_BY_ID = (sa.select(T_BILL.c.bill_id, T_BILL.c.amount_fen, T_BILL.c.prepaid_applied_fen,
                          T_BILL.c.principal_paid_fen, T_BILL.c.late_fee_paid_fen, T_BILL.c.accrual_micro,
                          T_BILL.c.accrual_date, T_BILL.c.status, T_BILL.c.paid_on)
                .where(T_BILL.c.bill_id.in_(_b("ids", expanding=True))))


# ---- what the transactions need ----
class _Bounds(Protocol):
    @property
    def cancel_race_retries(self) -> int: ...
    @property
    def query_bills_max(self) -> int: ...
    @property
    def db_wait_max_s(self) -> float: ...
    @property
    def pay_portable_sql(self) -> bool: ...
    @property
    def pay_pg_function(self) -> bool: ...
    @property
    def pay_batch_max(self) -> int: ...
    @property
    def pay_batch_callers(self) -> int: ...


class Books(Protocol):
    """What the money transactions need and nothing of the wire: the branch
    databases, the clock, the late-fee rates and two bounds. The edge passes
    its AdapterContext (which has these); the feed passes what it was given."""
    @property
    def router(self) -> BranchRouter: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def rates(self) -> LateFeeRates: ...
    @property
    def settings(self) -> _Bounds: ...


# ---- domain types ----
@dataclass(frozen=True)
class PayCommand:
    bank_id: str
    bank_serial: str
    account_no: str
    amount_fen: int
    outlet_code: str = ""
    teller_id: str = ""
    channel: str = "COUNTER"
    bank_balance_fen: int | None = None


@dataclass(frozen=True)
class PayResult:
    payment_id: str
    receipt_no: str
    settlement_date: dt.date
    allocations: tuple[Allocation, ...]
    arrears_after_fen: int
    prepaid_after_fen: int
    bank_serial: str
    account_no: str
    amount_fen: int
    posted_at: dt.datetime


@dataclass(frozen=True)
class CancelCommand:
    bank_id: str
    cancel_serial: str
    original_serial: str
    amount_fen: int
    reason: str = ""


@dataclass(frozen=True)
class CancelResult:
    outcome: str  # REVERSED or ORIGINAL_NOT_FOUND
    settlement_date: dt.date
    cancel_serial: str
    original_serial: str


@dataclass(frozen=True)
class PaymentStatus:
    state: str  # POSTED, REVERSED, NOT_FOUND, REFUSED
    payment: PayResult | None
    # What the bank reported with the payment (POSTED or REVERSED), as stored.
    channel: str = ""
    outlet_code: str = ""
    teller_id: str = ""
    bank_balance_fen: int | None = None


@dataclass(frozen=True)
class BillView:
    bill_id: int
    period: str
    kwh: int
    amount_fen: int
    principal_due_fen: int
    late_fee_fen: int
    due_date: dt.date
    status: str


@dataclass(frozen=True)
class AccountView:
    account_no: str
    customer_name: str
    branch_code: str
    arrears_fen: int
    late_fee_fen: int
    prepaid_fen: int
    bills: tuple[BillView, ...]
    as_of: dt.date
    closed: bool

    @property
    def total_due_fen(self) -> int:
        return self.arrears_fen + self.late_fee_fen


def payment_id_of(branch_code: str, pk: int) -> str:
    return f"{branch_code}{pk:010d}"


def receipt_no_of(branch_code: str, day: dt.date, pk: int) -> str:
    return f"{day.year:04d}{day.month:02d}{day.day:02d}{branch_code}{pk:010d}"




# ---- Pay ----
# How often Pay reads again when its guarded write found the account changed while it waited
# for a lock (pay_pg.py). A second read runs with the locks held, so one retry suffices.
PAY_READ_ATTEMPTS_MAX = 3


def pay(ctx: Books, cmd: PayCommand, *, time_left_s: float | None = None) -> PayResult:
    """Posts `cmd` (or answers a replay). `time_left_s` is the caller's remaining
    deadline: every database wait of the call is bounded by it (yindian_common.db)."""
    wait = db_wait_bound(ctx.settings, time_left_s)
    with db_watch.calls_due(wait.answer_by):  # a round trip still waiting then is cut: in doubt, not held
        if ctx.router.split:  # several branch databases: through the front registry (mis_adapter.cross_branch)
            from mis_adapter import cross_branch
            result, fresh = _db_call(cross_branch.pay, ctx, cmd, wait)
        else:
            result, fresh = pay_in(ctx, ctx.router.engine_for(cmd.account_no), cmd, wait)
    if fresh:
        crash_point("mis.after_commit")
        business_metrics.record_payment(cmd.bank_id, cmd.channel, cmd.amount_fen)
    else:
        business_metrics.record_payment_replay(cmd.bank_id)
    return result


def pay_in(ctx: Books, engine: Engine, cmd: PayCommand, wait: WaitBound | None = None
           ) -> tuple[PayResult, bool]:
    """The pay transaction in one database: (result, True) when it posted, (stored result, False) for a
    replay. `wait`: the call's database wait bound (None: the configured maximum)."""
    bound = wait if wait is not None else db_wait_bound(ctx.settings, None)
    try:
        return _db_call(_pay_tx, ctx, engine, cmd, bound)
    except IntegrityError:
        # The same (bank, serial) committed concurrently on another account: answer as a replay would.
        return _db_call(_replay_after_race, engine, cmd), False


def _pay_tx(ctx: Books, engine: Engine, cmd: PayCommand, wait: WaitBound) -> tuple[PayResult, bool]:
    """One transaction on the account's branch connection: (result, True) for a newly
    posted payment, (stored result, False) for a replay."""
    now = utc_now(ctx.clock)
    day = business_date(ctx.clock)
    settings = ctx.settings
    if settings.pay_pg_function and not settings.pay_portable_sql and engine.dialect.name == "postgresql":
        kept_pool = pay_pg.kept_connections(engine)
        if kept_pool is not None:
            if settings.pay_batch_max > 1:
                return _pay_batched(ctx, engine, kept_pool, cmd, wait, day, now)
            return _pay_alone(ctx, engine, kept_pool, cmd, wait, day, now)
    return _pay_pooled(ctx, engine, cmd, wait, day, now)


def _pay_alone(ctx: Books, engine: Engine, kept_pool: pay_pg.KeptConnections, cmd: PayCommand, wait: WaitBound,
               day: dt.date, now: dt.datetime) -> tuple[PayResult, bool]:
    """The pay alone on PostgreSQL: yd_pay on a kept connection, or on the pool when none is free."""
    kept = kept_pool.take()
    if kept is not None:
        return _pay_kept(ctx, engine, kept_pool, kept, cmd, wait, day, now)
    return _pay_pooled(ctx, engine, cmd, wait, day, now)


def _pay_batched(ctx: Books, engine: Engine, kept_pool: pay_pg.KeptConnections, cmd: PayCommand, wait: WaitBound,
                 day: dt.date, now: dt.datetime) -> tuple[PayResult, bool]:
    """The pay alone when a place is free, else in a batch with the pays waiting with it (pay_batch.py); called
    alone again, with what is left of its deadline, when its batch wrote nothing."""
    started = time.monotonic()
    settings = ctx.settings
    batcher = pay_batch.batcher_of(engine, kept_pool, callers_max=settings.pay_batch_callers,
                                   batch_max=settings.pay_batch_max)
    got = batcher.pay(pay_batch.batch_pay(cmd, day, now), wait_ms=wait.wait_ms, rates=ctx.rates,
                      alone=lambda: _pay_alone(ctx, engine, kept_pool, cmd, wait, day, now))
    if isinstance(got, pay_pg.PayCalled):
        return _called(got, cmd, day, now, lambda pk: _replay_of(engine, pk, cmd))
    if got is pay_batch.SINGLE:
        left_ms = wait.wait_ms - int((time.monotonic() - started) * 1000)
        if left_ms <= 0:
            raise Unavailable("the call's deadline passed while it waited for the database; nothing was written",
                              reason="DEADLINE_PASSED")
        alone = WaitBound(left_ms, left_ms + wait.idle_ms - wait.wait_ms, wait.answer_by)
        return _pay_alone(ctx, engine, kept_pool, cmd, alone, day, now)
    assert isinstance(got, tuple)
    return got


def _pay_pooled(ctx: Books, engine: Engine, cmd: PayCommand, wait: WaitBound, day: dt.date, now: dt.datetime
                ) -> tuple[PayResult, bool]:
    """The pay on a pool connection: PostgreSQL's one or two round trips (pay_pg.PayTx), or the portable path."""
    settings = ctx.settings
    with engine.connect() as conn:
        conn.begin()
        if conn.dialect.name == "postgresql" and not settings.pay_portable_sql:
            tx = pay_pg.PayTx(conn)
            try:
                if ctx.settings.pay_pg_function:
                    return _pay_one_trip(ctx, conn, tx, cmd, wait, day, now)
                return _pay_fast(ctx, conn, tx, cmd, wait, day, now)
            finally:
                tx.close()
        bound_waits(conn, wait)
        try:  # until the write, every way out has written nothing (pay_pg.end_write_free)
            seen = _read_for_pay_portable(conn, cmd, day)
            cust = seen.customer
            if cust is None:
                raise AccountNotFound(f"account {cmd.account_no} not found")
            if cust.taken_id is not None:  # a replay (or a conflict): answer from the stored payment
                existing = conn.execute(_PAYMENT_BY_ID, {"p_id": cust.taken_id}).one()
                answer = _answer_existing(conn, existing, cmd)
                pay_pg.end_write_free(conn)
                return answer, False
            if cust.status != "OPEN":
                raise AccountClosed(f"account {cmd.account_no} is closed")
        except YinDianError:
            pay_pg.end_write_free(conn)
            raise
        settlement = _settlement(day, cust)
        effects = payment_effects(cmd.amount_fen, seen.bills, cust.tariff_class, cust.prepaid_fen, day, ctx.rates)
        pk = _write_pay_portable(conn, cmd, cust, effects, settlement=settlement, now=now)
        crash_point("mis.before_commit")
        commit_or_doubt(conn)
    return _posted(cmd, cust, pk, settlement, effects, now), True


def _settlement(day: dt.date, cust: Any) -> dt.date:
    # The bank's reconciled today or its sign-off (日终签退) move the settlement to tomorrow.
    return settlement_date(day, today_reconciled=bool(cust.closed_today), next_reconciled=bool(cust.closed_next),
                           signed_off=bool(cust.signed_off))


def _posted(cmd: PayCommand, cust: Any, pk: int, settlement: dt.date, effects: PaymentEffects,
            now: dt.datetime) -> PayResult:
    return PayResult(payment_id_of(cust.branch_code, pk), receipt_no_of(cust.branch_code, settlement, pk),
                     settlement, effects.plan.allocations, effects.arrears_after_fen, effects.prepaid_after_fen,
                     cmd.bank_serial, cmd.account_no, cmd.amount_fen, now)


def _pay_fast(ctx: Books, conn: Connection, tx: pay_pg.PayTx, cmd: PayCommand, wait: WaitBound, day: dt.date,
              now: dt.datetime) -> tuple[PayResult, bool]:
    """Pay on PostgreSQL in two round trips (pay_pg.PayTx): BEGIN+READ, then WRITE+COMMIT. A guard
    that fails there has committed a transaction that wrote nothing (only after READ waited for a
    lock, or lost a race to one): the pay then reads again in a new transaction and sends its WRITE
    alone, so that a guard failing again re-reads with the locks held (which cannot fail: a third
    attempt at most). Every way out before a write (a replay answered, a refusal) ends in COMMIT
    (PayTx.end_write_free), keeping the connection's prepared statements."""
    commit_with_write = True
    wrote = False
    try:
        for _attempt in range(PAY_READ_ATTEMPTS_MAX):
            seen = tx.read(account_no=cmd.account_no, bank_id=cmd.bank_id, serial=cmd.bank_serial, day=day,
                           day_key=bank_day_key(cmd.bank_id), wait_ms=wait.wait_ms, idle_ms=wait.idle_ms)
            cust = seen.customer
            if cust is None:
                raise AccountNotFound(f"account {cmd.account_no} not found")
            if cust.taken_id is not None:  # a replay (or a conflict): answer from the stored payment
                tx.pause()
                existing = conn.execute(_PAYMENT_BY_ID, {"p_id": cust.taken_id}).one()
                answer = _answer_existing(conn, existing, cmd)
                tx.end_write_free()
                return answer, False
            if cust.suspended:
                raise BankSuspended(f"bank {cmd.bank_id} is suspended by the utility (停工): {cust.suspended_reason}")
            if cust.status != "OPEN":
                raise AccountClosed(f"account {cmd.account_no} is closed")
            settlement = _settlement(day, cust)
            effects = payment_effects(cmd.amount_fen, seen.bills, cust.tariff_class, cust.prepaid_fen, day,
                                      ctx.rates)
            if commit_with_write:
                crash_point("mis.before_commit")  # nothing sent yet of WRITE and its COMMIT
            # A guard that fails writes nothing (pay_pg.WRITE_PAY): the transaction stays write-free.
            pk = tx.write(seen, effects, cmd=cmd, day=day, settlement=settlement, now=now, commit=commit_with_write)
            if pk is not None:
                if not commit_with_write:
                    wrote = True
                    crash_point("mis.before_commit")
                    tx.commit()
                return _posted(cmd, cust, pk, settlement, effects, now), True
            commit_with_write = False
        raise Unavailable("the account kept changing while the payment waited; retry the same serial",
                          reason="RETRY")
    except YinDianError:  # a refusal, decided by our code (or a COMMIT in doubt, which ended the transaction)
        if not wrote:
            tx.end_write_free()
        raise


def _pay_one_trip(ctx: Books, conn: Connection, tx: pay_pg.PayTx, cmd: PayCommand, wait: WaitBound, day: dt.date,
                  now: dt.datetime) -> tuple[PayResult, bool]:
    """Pay on PostgreSQL in one round trip: the function yd_pay (pay_pg.PayTx.call) locks, reads, prices,
    allocates and writes, or answers why not; its transaction ends at the round trip's end. A bill that
    changed under it (only a writer without the account lock: pay_pg.py) rolls it back; the pay then
    calls again (PAY_READ_ATTEMPTS_MAX in all). The crash point before the commit is before the call
    is sent: from there on the server decides and commits alone."""
    for _attempt in range(PAY_READ_ATTEMPTS_MAX):
        crash_point("mis.before_commit")
        got = tx.call(cmd=cmd, day=day, day_key=bank_day_key(cmd.bank_id), now=now, wait_ms=wait.wait_ms,
                      rates=ctx.rates)
        if got is not None:
            return _called(got, cmd, day, now, lambda pk: _answer_existing(
                conn, conn.execute(_PAYMENT_BY_ID, {"p_id": pk}).one(), cmd))  # autocommit reads
    raise Unavailable("the account kept changing while the payment waited; retry the same serial", reason="RETRY")


def _pay_kept(ctx: Books, engine: Engine, pool: pay_pg.KeptConnections, kept: pay_pg.KeptConnection,
              cmd: PayCommand, wait: WaitBound, day: dt.date, now: dt.datetime) -> tuple[PayResult, bool]:
    """_pay_one_trip on a kept connection (pay_pg.KeptConnections): the same calls and answers, without a
    pool checkout. The connection goes back after calls that raised nothing and left no transaction open;
    after anything else it is closed. A replay is answered on a pool connection, after it went back."""
    day_key = bank_day_key(cmd.bank_id)
    answer_by = wait.answer_by or answer_due(wait.wait_ms)  # for every attempt together
    got = None
    try:
        for _attempt in range(PAY_READ_ATTEMPTS_MAX):
            crash_point("mis.before_commit")
            got = pay_pg.call_kept(kept, cmd=cmd, day=day, day_key=day_key, now=now, wait_ms=wait.wait_ms,
                                   rates=ctx.rates, answer_by=answer_by)
            if got is not None:
                break
    except BaseException:
        pool.discard(kept)
        raise
    pool.give_back(kept)
    if got is None:
        raise Unavailable("the account kept changing while the payment waited; retry the same serial",
                          reason="RETRY")
    return _called(got, cmd, day, now, lambda pk: _replay_of(engine, pk, cmd))


def _called(got: pay_pg.PayCalled, cmd: PayCommand, day: dt.date, now: dt.datetime,
            taken: Callable[[int], PayResult]) -> tuple[PayResult, bool]:
    """yd_pay's answer as Pay's: (result, True) when it posted, (the stored payment's answer from `taken`,
    False) for a replay; a refusal raises."""
    code = got.code
    if code == "POSTED":
        assert got.payment_id is not None and got.branch_code is not None and got.settlement is not None
        pk, branch, settlement = got.payment_id, got.branch_code, got.settlement
        allocs = tuple(Allocation(b, f, p) for b, f, p in got.allocations())
        return PayResult(payment_id_of(branch, pk), receipt_no_of(branch, settlement, pk), settlement, allocs,
                         int(got.arrears_after or 0), int(got.prepaid_after or 0), cmd.bank_serial,
                         cmd.account_no, cmd.amount_fen, now), True
    if code == "NOT_FOUND":
        raise AccountNotFound(f"account {cmd.account_no} not found")
    if code == "TAKEN":  # a replay (or a conflict): answer from the stored payment
        assert got.payment_id is not None
        return taken(got.payment_id), False
    if code == "SUSPENDED":
        raise BankSuspended(f"bank {cmd.bank_id} is suspended by the utility (停工): {got.refusal}")
    if code == "CLOSED":
        raise AccountClosed(f"account {cmd.account_no} is closed")
    if code == "DAY_CLOSED":
        settlement_date(day, today_reconciled=True, next_reconciled=True)  # raises DayClosed, as Pay's rule
    raise AssertionError(f"yd_pay answered {code!r}")


def _replay_of(engine: Engine, pk: int, cmd: PayCommand) -> PayResult:
    """The answer to a replay of the stored payment `pk`, read in a read-only transaction ended by COMMIT
    (pay_pg.end_write_free), a refusal too."""
    with engine.connect().execution_options(read_only=True) as conn, conn.begin():
        try:
            return _answer_existing(conn, conn.execute(_PAYMENT_BY_ID, {"p_id": pk}).one(), cmd)
        except YinDianError:
            pay_pg.end_write_free(conn)
            raise


def _read_for_pay_portable(conn: Connection, cmd: PayCommand, day: dt.date) -> pay_pg.PayRead:
    """SQLite and MariaDB: the bank-day lock, then the account lock, then its bills."""
    lock_bank_day(conn, cmd.bank_id)
    cust = conn.execute(_LOCK_CUSTOMER_FOR_PAY, {"account_no": cmd.account_no, "bank_id": cmd.bank_id,
                                                 "serial": cmd.bank_serial, "day": day,
                                                 "next_day": day + ONE_DAY}).first()
    if cust is None or cust.taken_id is not None or cust.status != "OPEN":
        return pay_pg.PayRead(cust, (), "")
    return pay_pg.PayRead(cust, tuple(conn.execute(_UNPAID_BILLS, {"account_no": cmd.account_no}).all()), "")


def _write_pay_portable(conn: Connection, cmd: PayCommand, cust: Any, effects: PaymentEffects, *,
                        settlement: dt.date, now: dt.datetime) -> int:
    pk = _write_payment(conn, cmd, cust, effects, settlement=settlement, now=now)
    conn.execute(_INSERT_JOURNAL, {"at": now, "bank_id": cmd.bank_id, "rpc": "PAY", "serial": cmd.bank_serial,
                                   "original_serial": "", "account_no": cmd.account_no,
                                   "amount_fen": cmd.amount_fen, "outcome": POSTED, "payment_id": pk})
    return pk


@dataclass(frozen=True)
class Posted:
    payment_pk: int
    plan: AllocationPlan
    arrears_after_fen: int
    prepaid_after_fen: int


def pay_in_tx(conn: Connection, rates: LateFeeRates, cmd: PayCommand, cust: Any, *, fee_day: dt.date,
              settlement: dt.date, now: dt.datetime) -> Posted:
    """Pay's writes for a new payment inside the caller's transaction: the
    allocation and rows of `post_payment_in_tx` and Pay's journal line. Used by
    the bill feed for debits its bulk path does not settle; the caller holds
    the bank-day and account locks, has checked the serial and that the
    account is open, and records the payment metric after commit."""
    posted = post_payment_in_tx(conn, rates, cmd, cust, fee_day=fee_day, settlement=settlement, now=now)
    conn.execute(_INSERT_JOURNAL, {"at": now, "bank_id": cmd.bank_id, "rpc": "PAY", "serial": cmd.bank_serial,
                                   "original_serial": "", "account_no": cmd.account_no,
                                   "amount_fen": cmd.amount_fen, "outcome": POSTED, "payment_id": posted.payment_pk})
    return posted


def post_payment_in_tx(conn: Connection, rates: LateFeeRates, cmd: PayCommand, cust: Any, *, fee_day: dt.date,
                       settlement: dt.date, now: dt.datetime) -> Posted:
    """Allocates a new payment over the account's unpaid bills (late fees as of
    `fee_day`) and writes it: the payment row, its allocations, the bills and
    any prepaid credit with its ledger line. The caller's transaction holds
    the bank-day and account locks and has checked the serial and the
    account's status; `cust` has branch_code, tariff_class and prepaid_fen."""
    rows = conn.execute(_UNPAID_BILLS, {"account_no": cmd.account_no}).all()
    effects = payment_effects(cmd.amount_fen, rows, cust.tariff_class, cust.prepaid_fen, fee_day, rates)
    pk = _write_payment(conn, cmd, cust, effects, settlement=settlement, now=now)
    return Posted(pk, effects.plan, effects.arrears_after_fen, effects.prepaid_after_fen)


def _write_payment(conn: Connection, cmd: PayCommand, cust: Any, effects: PaymentEffects, *,
                   settlement: dt.date, now: dt.datetime) -> int:
    """The rows of `effects` with SQLAlchemy Core (multi-row statements); the new payment's id."""
    plan = effects.plan
    pk: int = conn.execute(_INSERT_PAYMENT, {
        "bank_id": cmd.bank_id, "bank_serial": cmd.bank_serial, "state": POSTED,
        "account_no": cmd.account_no, "branch_code": cust.branch_code, "amount_fen": cmd.amount_fen,
        "channel": cmd.channel, "outlet_code": cmd.outlet_code, "teller_id": cmd.teller_id,
        "bank_balance_fen": cmd.bank_balance_fen, "settlement_date": settlement, "posted_at": now,
        "arrears_after_fen": effects.arrears_after_fen, "prepaid_after_fen": effects.prepaid_after_fen,
        "prepaid_added_fen": plan.prepaid_fen, "reversed_at": None, "reversed_on": None,
        "cancel_serial": None}).inserted_primary_key[0]  # type: ignore[index]
    if plan.allocations:
        conn.execute(_INSERT_ALLOC, [{"payment_id": pk, "bill_id": a.bill_id, "late_fee_fen": a.late_fee_fen,
                                      "principal_fen": a.principal_fen} for a in plan.allocations])
        conn.execute(_UPDATE_BILL, [{"b_id": u.bill_id, "principal_paid": u.principal_paid_fen,
                                     "fee_paid": u.late_fee_paid_fen, "micro": u.accrual_micro,
                                     "micro_date": u.accrual_date, "new_status": u.status,
                                     "new_paid_on": u.paid_on} for u in effects.bill_updates])
    if plan.prepaid_fen:
        conn.execute(_ADD_PREPAID, {"acct": cmd.account_no, "delta": plan.prepaid_fen})
        conn.execute(_INSERT_PREPAID, {"account_no": cmd.account_no, "reason": "PAYMENT",
                                       "delta_fen": plan.prepaid_fen, "balance_after_fen": effects.prepaid_after_fen,
                                       "payment_id": pk, "bill_id": None, "at": now})
    return pk


def _same_request(existing: Any, cmd: PayCommand) -> bool:
    return (existing.account_no == cmd.account_no and existing.amount_fen == cmd.amount_fen
            and existing.channel == cmd.channel and existing.outlet_code == cmd.outlet_code
            and existing.teller_id == cmd.teller_id)


def _answer_existing(conn: Connection, existing: Any, cmd: PayCommand) -> PayResult:
    if existing.state == TOMBSTONE:
        raise SerialReversed(f"bank_serial {cmd.bank_serial} was cancelled before it arrived; pay refused")
    if not _same_request(existing, cmd):
        raise SerialConflict(f"bank_serial {cmd.bank_serial} was used with different parameters")
    if existing.state == REVERSED:
        raise SerialReversed(f"bank_serial {cmd.bank_serial} was reversed")
    return _result_of(conn, existing)


def _replay_after_race(engine: Engine, cmd: PayCommand) -> PayResult:
    with engine.connect().execution_options(read_only=True) as conn, conn.begin():
        try:
            existing = conn.execute(_PAYMENT_BY_SERIAL, {"bank_id": cmd.bank_id, "serial": cmd.bank_serial}).first()
            if existing is None:
                raise Unavailable("payment raced with a concurrent request; retry the same serial", reason="RETRY")
            return _answer_existing(conn, existing, cmd)
        except YinDianError:  # a refusal read nothing it must undo: COMMIT, not ROLLBACK (pay_pg.end_write_free)
            pay_pg.end_write_free(conn)
            raise


def _result_of(conn: Connection, p: Any) -> PayResult:
    allocs = tuple(Allocation(r.bill_id, r.late_fee_fen, r.principal_fen)
                   for r in conn.execute(_ALLOCS_OF, {"payment_id": p.payment_id}))
    return PayResult(payment_id_of(p.branch_code, p.payment_id),
                     receipt_no_of(p.branch_code, p.settlement_date, p.payment_id), p.settlement_date, allocs,
                     p.arrears_after_fen, p.prepaid_after_fen, p.bank_serial, p.account_no or "", p.amount_fen,
                     _aware(p.posted_at))


def _aware(t: dt.datetime) -> dt.datetime:
    # SQLite and MariaDB hand back naive datetimes; we store UTC.
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


# ---- GetPayment ----
def get_payment(ctx: Books, bank_id: str, bank_serial: str) -> PaymentStatus:
    return _db_call(_get_payment, ctx, bank_id, bank_serial)


def _get_payment(ctx: Books, bank_id: str, bank_serial: str) -> PaymentStatus:
    if ctx.router.split:
        from mis_adapter import cross_branch
        return cross_branch.get_payment(ctx, bank_id, bank_serial)
    for engine in ctx.router.engines():
        found = status_in(engine, bank_id, bank_serial)
        if found is not None:
            return found
    return PaymentStatus("NOT_FOUND", None)


def status_in(engine: Engine, bank_id: str, bank_serial: str) -> PaymentStatus | None:
    """The serial's payment (or tombstone) in one database; None when it holds neither."""
    with engine.connect().execution_options(read_only=True) as conn, conn.begin():
        p = conn.execute(_PAYMENT_BY_SERIAL, {"bank_id": bank_id, "serial": bank_serial}).first()
        if p is None:
            return None
        if p.state == TOMBSTONE:
            return PaymentStatus("REFUSED", None)
        return PaymentStatus(p.state, _result_of(conn, p), p.channel, p.outlet_code, p.teller_id,
                             p.bank_balance_fen)


# ---- Cancel (冲正) ----
def cancel(ctx: Books, cmd: CancelCommand, *, time_left_s: float | None = None) -> CancelResult:
    wait = db_wait_bound(ctx.settings, time_left_s)
    for _attempt in range(ctx.settings.cancel_race_retries):
        try:
            with db_watch.calls_due(wait.answer_by):  # as Pay's
                if ctx.router.split:  # several branch databases: through the front registry
                    from mis_adapter import cross_branch
                    result, fresh = _db_call(cross_branch.cancel, ctx, cmd, wait)
                else:
                    result, fresh = _db_call(_cancel_once, ctx, cmd, wait)
            if fresh:
                business_metrics.record_cancel(cmd.bank_id, result.outcome, cmd.amount_fen)
            return result
        except IntegrityError:
            continue  # the payment (or the same cancel) committed meanwhile: look again
    raise Unavailable("cancel kept racing its payment; retry the same cancel_serial", reason="RETRY")


def _find_cancel(ctx: Books, cmd: CancelCommand) -> Any:
    for engine in ctx.router.engines():
        with engine.connect().execution_options(read_only=True) as conn, conn.begin():
            row = conn.execute(_CANCEL_BY_SERIAL, {"bank_id": cmd.bank_id, "serial": cmd.cancel_serial}).first()
            if row is not None:
                return row
    return None


def _answer_cancel_replay(row: Any, cmd: CancelCommand) -> CancelResult:
    if row.original_serial != cmd.original_serial or row.amount_fen != cmd.amount_fen:
        raise SerialConflict(f"cancel_serial {cmd.cancel_serial} was used with different parameters")
    return CancelResult(row.outcome, row.settlement_date, row.cancel_serial, row.original_serial)


def _cancel_once(ctx: Books, cmd: CancelCommand, wait: WaitBound) -> tuple[CancelResult, bool]:
    """(result, True) when this call applied the cancel, (stored result, False) for a replay."""
    previous = _find_cancel(ctx, cmd)
    if previous is not None:
        return _answer_cancel_replay(previous, cmd), False
    for engine in ctx.router.engines():
        with engine.connect().execution_options(read_only=True) as conn, conn.begin():
            p = conn.execute(_PAYMENT_BY_SERIAL, {"bank_id": cmd.bank_id, "serial": cmd.original_serial}).first()
        if p is not None:
            return _reverse(ctx, engine, p, cmd, wait)
    return _tombstone(ctx, cmd, wait), True


def cancel_in(ctx: Books, engine: Engine, cmd: CancelCommand, wait: WaitBound | None = None
              ) -> tuple[CancelResult, bool]:
    """The cancel in the one database that holds (or will hold) its original: a replay,
    a reversal, or a tombstone there. IntegrityError when its pay committed meanwhile."""
    bound = wait if wait is not None else db_wait_bound(ctx.settings, None)
    with engine.connect().execution_options(read_only=True) as conn, conn.begin():
        previous = conn.execute(_CANCEL_BY_SERIAL, {"bank_id": cmd.bank_id, "serial": cmd.cancel_serial}).first()
        p = conn.execute(_PAYMENT_BY_SERIAL, {"bank_id": cmd.bank_id, "serial": cmd.original_serial}).first()
    if previous is not None:
        return _answer_cancel_replay(previous, cmd), False
    if p is not None:
        return _reverse(ctx, engine, p, cmd, bound)
    now = utc_now(ctx.clock)
    day = business_date(ctx.clock)
    with engine.connect() as conn:
        conn.begin()
        bound_waits(conn, bound)
        _write_tombstone(conn, cmd, now, day, with_cancel=True)
        commit_or_doubt(conn)
    return CancelResult("ORIGINAL_NOT_FOUND", day, cmd.cancel_serial, cmd.original_serial), True


def _write_tombstone(conn: Connection, cmd: CancelCommand, now: dt.datetime, day: dt.date, *,
                     with_cancel: bool) -> None:
    conn.execute(_INSERT_PAYMENT, {
        "bank_id": cmd.bank_id, "bank_serial": cmd.original_serial, "state": TOMBSTONE,
        "account_no": None, "branch_code": "", "amount_fen": cmd.amount_fen, "channel": "",
        "outlet_code": "", "teller_id": "", "bank_balance_fen": None, "settlement_date": day,
        "posted_at": now, "arrears_after_fen": 0, "prepaid_after_fen": 0, "prepaid_added_fen": 0,
        "reversed_at": None, "reversed_on": None, "cancel_serial": cmd.cancel_serial})
    if with_cancel:
        conn.execute(_INSERT_CANCEL, {"bank_id": cmd.bank_id, "cancel_serial": cmd.cancel_serial,
                                      "original_serial": cmd.original_serial, "amount_fen": cmd.amount_fen,
                                      "reason": cmd.reason, "outcome": "ORIGINAL_NOT_FOUND",
                                      "settlement_date": day, "payment_id": None, "created_at": now})
        conn.execute(_INSERT_JOURNAL, {"at": now, "bank_id": cmd.bank_id, "rpc": "CANCEL",
                                       "serial": cmd.cancel_serial, "original_serial": cmd.original_serial,
                                       "account_no": "", "amount_fen": cmd.amount_fen,
                                       "outcome": "ORIGINAL_NOT_FOUND", "payment_id": None})


def _reverse(ctx: Books, engine: Engine, found: Any, cmd: CancelCommand, wait: WaitBound
             ) -> tuple[CancelResult, bool]:
    now = utc_now(ctx.clock)
    day = business_date(ctx.clock)
    with engine.connect() as conn:
        conn.begin()
        bound_waits(conn, wait)
        # Until _undo_payment writes, every way out (a replay answered, a refusal) has written nothing:
        # on PostgreSQL it ends in COMMIT (pay_pg.end_write_free), not in the ROLLBACK at which psycopg
        # forgets the prepared statements of a connection the pays share.
        try:
            lock_bank_day(conn, cmd.bank_id)
            if found.account_no:
                conn.execute(_LOCK_CUSTOMER, {"account_no": found.account_no}).first()
            again = conn.execute(_CANCEL_BY_SERIAL, {"bank_id": cmd.bank_id, "serial": cmd.cancel_serial}).first()
            if again is not None:
                answer = _answer_cancel_replay(again, cmd)
                pay_pg.end_write_free(conn)
                return answer, False
            p = conn.execute(_PAYMENT_BY_SERIAL, {"bank_id": cmd.bank_id, "serial": cmd.original_serial}).one()
            undo = False
            if p.state == TOMBSTONE:
                outcome = "ORIGINAL_NOT_FOUND"
            elif p.amount_fen != cmd.amount_fen:
                raise Precondition(f"amount_fen {cmd.amount_fen} does not match the original payment's "
                                   f"{p.amount_fen}", field="amount_fen", reason="AMOUNT_MISMATCH")
            elif p.state == REVERSED:
                outcome = "REVERSED"
            else:
                if conn.execute(_DAY_CLOSED, {"bank_id": cmd.bank_id, "day": p.settlement_date}).first():
                    raise DayClosed(f"settlement date {p.settlement_date} is reconciled; "
                                    "payment cannot be cancelled")
                undo = True
                outcome = "REVERSED"
        except YinDianError:
            pay_pg.end_write_free(conn)
            raise
        if undo:
            _undo_payment(conn, p, now, day, cmd.cancel_serial)
        conn.execute(_INSERT_CANCEL, {"bank_id": cmd.bank_id, "cancel_serial": cmd.cancel_serial,
                                      "original_serial": cmd.original_serial, "amount_fen": cmd.amount_fen,
                                      "reason": cmd.reason, "outcome": outcome, "settlement_date": day,
                                      "payment_id": p.payment_id, "created_at": now})
        conn.execute(_INSERT_JOURNAL, {"at": now, "bank_id": cmd.bank_id, "rpc": "CANCEL",
                                       "serial": cmd.cancel_serial, "original_serial": cmd.original_serial,
                                       "account_no": p.account_no or "", "amount_fen": cmd.amount_fen,
                                       "outcome": outcome, "payment_id": p.payment_id})
        commit_or_doubt(conn)
    return CancelResult(outcome, day, cmd.cancel_serial, cmd.original_serial), True


def reverse_payment_in_tx(conn: Connection, payment: Any, now: dt.datetime, day: dt.date, cancel_serial: str) -> None:
    """Undo a POSTED payment inside the caller's transaction (the caller holds the account lock)."""
    _undo_payment(conn, payment, now, day, cancel_serial)


def _undo_payment(conn: Connection, p: Any, now: dt.datetime, day: dt.date, cancel_serial: str) -> None:
    """Restores bills, late fees paid and prepaid credit exactly as the payment changed them.
    Accrual stays as computed: the fee up to the payment day does not depend on payments of that day."""
    allocs = conn.execute(_ALLOCS_OF, {"payment_id": p.payment_id}).all()
    if allocs:
        bills = {b.bill_id: b for b in conn.execute(_BILLS_BY_ID, {"ids": [a.bill_id for a in allocs]})}
        updates = []
        for a in allocs:
            b = bills[a.bill_id]
            principal_paid = b.principal_paid_fen - a.principal_fen
            fee_paid = b.late_fee_paid_fen - a.late_fee_fen
            if principal_paid < 0 or fee_paid < 0:
                raise Precondition(f"bill {b.bill_id} cannot be restored", reason="RESTORE_IMPOSSIBLE")
            status = bill_status(b.amount_fen, b.prepaid_applied_fen, principal_paid, fee_paid)
            updates.append({"b_id": b.bill_id, "principal_paid": principal_paid, "fee_paid": fee_paid,
                            "micro": b.accrual_micro, "micro_date": b.accrual_date, "new_status": status,
                            "new_paid_on": b.paid_on if status == "PAID" else None})
        conn.execute(_UPDATE_BILL, updates)
    if p.prepaid_added_fen:
        cust = conn.execute(_READ_CUSTOMER, {"account_no": p.account_no}).one()
        balance = cust.prepaid_fen - p.prepaid_added_fen
        if balance < 0:
            raise Precondition(f"prepaid credit of payment {p.bank_serial} was already applied to new bills",
                               reason="PREPAID_CONSUMED")
        conn.execute(_ADD_PREPAID, {"acct": p.account_no, "delta": -p.prepaid_added_fen})
        conn.execute(_INSERT_PREPAID, {"account_no": p.account_no, "reason": "REVERSAL",
                                       "delta_fen": -p.prepaid_added_fen, "balance_after_fen": balance,
                                       "payment_id": p.payment_id, "bill_id": None, "at": now})
    n = conn.execute(_REVERSE_PAYMENT, {"p_id": p.payment_id, "at": now, "day": day,
                                        "c_serial": cancel_serial}).rowcount
    if n != 1:
        raise Precondition(f"payment {p.bank_serial} is no longer posted", reason="NOT_POSTED")


def _tombstone(ctx: Books, cmd: CancelCommand, wait: WaitBound) -> CancelResult:
    """The original is unknown everywhere: leave a tombstone in every branch
    database so that a late Pay with that serial is refused. A Pay committing
    meanwhile makes the insert fail (unique key) and the cancel starts over."""
    now = utc_now(ctx.clock)
    day = business_date(ctx.clock)
    for i, engine in enumerate(ctx.router.engines()):
        with engine.connect() as conn:
            conn.begin()
            bound_waits(conn, wait)
            _write_tombstone(conn, cmd, now, day, with_cancel=i == 0)
            commit_or_doubt(conn)
    return CancelResult("ORIGINAL_NOT_FOUND", day, cmd.cancel_serial, cmd.original_serial)


# ---- QueryAccount ----
def query_account(ctx: Books, account_no: str) -> AccountView:
    return _db_call(_query_account, ctx, account_no)


def _query_account(ctx: Books, account_no: str) -> AccountView:
    day = business_date(ctx.clock)
    engine = ctx.router.engine_for(account_no)
    with engine.connect().execution_options(read_only=True) as conn, conn.begin():
        cust = conn.execute(_READ_CUSTOMER, {"account_no": account_no}).first()
        if cust is None:
            raise AccountNotFound(f"account {account_no} not found")
        rows = conn.execute(_UNPAID_BILLS, {"account_no": account_no}).all()
    due = bills_due(rows, cust.tariff_class, day, ctx.rates)
    views = tuple(BillView(r.bill_id, r.period, r.kwh, r.amount_fen, d.principal_due_fen, d.late_fee_due_fen,
                           r.due_date, r.status) for r, d, _ in due)
    return AccountView(account_no, mask_name(cust.name), cust.branch_code,
                       sum(v.principal_due_fen for v in views), sum(v.late_fee_fen for v in views),
                       cust.prepaid_fen, views[: ctx.settings.query_bills_max], day, cust.status != "OPEN")
