"""Pay on PostgreSQL in one round trip (setting pay_pg_function, the default) or in
two (off): issue 11.

ONE ROUND TRIP (PayTx.call): CALL_BOUNDS (SET LOCAL of the call's lock and statement
timeouts and of generic plans) and PAY_CALL, the function yd_pay of migration
0004_pay_function, in pipeline mode in autocommit: one implicit transaction that the
server commits at the Sync ending the round trip. No transaction is ever open while
the client computes, so there is no idle bound to keep. yd_pay takes the bank-day
lock shared, then the account row FOR UPDATE (statement 1), then reads in statement 2
(a new READ COMMITTED snapshot, taken with both locks held) the serial, the bank's
suspension, reconciled today/tomorrow and sign-off, and the unpaid bills; prices and
allocates by the rules of late_fee.py, allocation.py and pay_plan.py (restated in
PL/pgSQL, property-tested equal to this module's Python path on PostgreSQL:
tests/mis_adapter/test_pay_function.py), and writes in statement 3 (one CTE, four
variants as below) or answers a refusal code that wrote nothing.

Why statement 2 needs no guard for the bank's state and for what it did not write:
reconciliation takes the bank-day lock EXCLUSIVE (reconciled days, BANK_ONLY and
UTILITY_ONLY postings): a snapshot taken after our shared lock is granted sees every
such commit. Sign-off and suspension take no lock a pay waits for: statement 2 reads
them as the two-trip path's WRITE guard does, in a snapshot taken after the locks,
just before the commit. The bills: every writer of an account's bills holds that account's
row lock: issuance (issue_bills._LOCK_CUSTOMERS), the feed's posting
(feed._LOCK_CUSTOMERS, after the bank-day lock), reconciliation BANK_ONLY
(recon_bulk._LOCK_CUSTOMERS, recon_bank_only._LOCK) and UTILITY_ONLY reversal
(recon_bulk.reverse_utility_only), cancel (payments._reverse), Pay itself and the
feed's general path (payments.pay_in_tx under the feed's locks); refunds write only
the prepaid balance under the account lock (refunds._PREPAID_OF); the feed's dunning
flag (feed._DUN_BILLS) is a column Pay neither reads nor writes; late fees accrue only
in those writers' own rows (no separate accrual job). One writer does not: the
feed's bulk settle (feed._SETTLE_BILLS) of a bill that a notice names under another
account (feed._batch_bills reads such a bill by id) locks the notice's account, not
the bill's. So yd_pay keeps one guard, on the bills it writes only: each UPDATE
matches the version (xmin) it priced; a bill changed meanwhile (the UPDATE waited
for that writer, then re-checked its row) makes yd_pay raise BILL_CHANGED, its
transaction rolls back, and Pay calls again (payments.PAY_READ_ATTEMPTS_MAX).
Bills it does not write may change under it only by that writer, ordered after this
pay. The account row needs no guard: locked FOR UPDATE, it is read at its newest
version and kept so.

SEVERAL PAYS IN ONE ROUND TRIP (call_kept_many, setting pay_batch_max > 1): the pays waiting at the same
moment (mis_adapter.pay_batch) in one call of yd_pay_many (migration 0004_paybatch_pay_many), which calls
yd_pay for each in account order in one transaction: the same answers and rows as the pays one after
another in that order (tests/mis_adapter/test_pay_batch.py); an error in any rolls back all.

TWO ROUND TRIPS (PayTx.read/write, pay_pg_function off): BEGIN and
READ, then WRITE and COMMIT, in pipeline mode (PayTx).

READ: one statement that bounds this transaction's waits (`set_config(...,
true)`, i.e. SET LOCAL, no extra round trip), takes the bank-day lock SHARED
(banks.py: the advisory lock reconciliation takes EXCLUSIVE), locks the
account row and reads all a pay needs: the customer, its unpaid bills, the
serial, whether today and tomorrow are reconciled (one range scan of the
key: RECONCILED_DAYS) and whether the bank is suspended (one lookup) or
signed off (link_state). The bank-day lock is taken in a MATERIALIZED CTE that the locked
row is joined with, so it is held before the account row is locked (the
same order as everywhere: bank-day, then accounts).

WRITE: one statement (data-modifying CTEs over `unnest` arrays) that writes
the payment, its allocations, the bills, any prepaid credit with its ledger
line and the journal line, guarded: it writes nothing unless the unpaid
bills (their xmin versions), the bank's reconciled days and its sign-off
are exactly as READ saw them. READ's snapshot may predate a wait for the
account lock or the bank-day lock (READ COMMITTED takes the snapshot when
the statement starts); WRITE's snapshot is taken after both locks are held,
so the guard sees every commit that READ could have missed, and nothing can
change the bills and days afterwards until we commit. When the guard fails (only after
such a wait, or a sign-off meanwhile) Pay reads again in the same transaction, now without waiting.
The account row itself needs no re-check: READ locks it FOR UPDATE, and a
row locked after a wait is re-read at its newest version (READ COMMITTED's
re-check of a locked row), so READ's customer columns are current, and the
lock keeps them so until we commit. The bills joined to it are not re-read
that way: they are as of READ's snapshot, hence their versions in the guard.

Statements are plain driver SQL strings built once, prepared on each
connection, and SQLAlchemy compiles nothing. They go in pipeline mode (PayTx):
BEGIN, READ and a Sync in one round trip; WRITE, COMMIT and a Sync in another.
READ also sets plan_cache_mode
to force_generic_plan for the rest of the transaction: left to choose,
PostgreSQL re-plans WRITE at every execution (its generic plan's estimate
never beats the custom ones), ~0.3 ms of server CPU per pay; its generic plan
is index lookups by key only (checked with EXPLAIN)."""
from __future__ import annotations

import contextlib
import datetime as dt
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from mis_adapter.pay_plan import PaymentEffects
from yindian_common import db_watch
from yindian_common.business_metrics import db_label, record_db_error
from yindian_common.db import POOL_RECYCLE_S, answer_due, kept_wait_fits, stepped_wait_ms
from yindian_common.db_errors import COMMIT_IN_DOUBT
from yindian_common.errors import Unavailable
from yindian_common.libpq import raise_error

# Whether the bank's `day` and `day + 1` are reconciled, in one range scan of the key: bit 0 the day,
# bit 1 the next (0 to 3; `closed_bits`). READ and WRITE's guard both read it; $2 is the bank.
RECONCILED_DAYS = """coalesce(bit_or(1 << (r.settlement_date - {day}::date)), 0) FROM reconciled_days r
          WHERE r.bank_id = $2 AND r.settlement_date BETWEEN {day}::date AND {day}::date + 1"""


def closed_bits(closed_today: bool, closed_next: bool) -> int:
    """The Python side of RECONCILED_DAYS: its value for the two facts."""
    return int(closed_today) | int(closed_next) << 1


# PostgreSQL's own $n placeholders (psycopg's RawCursor): psycopg rewrites nothing, and each
# statement is prepared on its connection (prepare=True) from its first execution.
READ_FOR_PAY = """
WITH bounds AS MATERIALIZED (
  SELECT set_config('lock_timeout', $5, true) AS lock_bound,
         set_config('statement_timeout', $5, true) AS statement_bound,
         set_config('idle_in_transaction_session_timeout', $6, true) AS idle_bound,
         set_config('plan_cache_mode', 'force_generic_plan', true) AS write_plan,
         pg_advisory_xact_lock_shared($7::bigint) AS day_lock)
SELECT c.branch_code, c.tariff_class, c.status, c.prepaid_fen,
       (SELECT """ + RECONCILED_DAYS.format(day="$4") + """),
       (SELECT p.payment_id FROM payments p WHERE p.bank_id = $2 AND p.bank_serial = $3),
       (SELECT k.suspended_reason FROM banks k WHERE k.bank_id = $2 AND k.suspended),
       EXISTS (SELECT 1 FROM bank_links l
               WHERE l.bank_id = $2 AND l.state = 'SIGNED_OFF' AND l.business_date >= $4::date),
       b.bill_id, b.period, b.amount_fen, b.prepaid_applied_fen, b.principal_paid_fen, b.late_fee_paid_fen,
       b.accrual_micro, b.accrual_date, b.xmin::text
FROM bounds CROSS JOIN customers c
LEFT JOIN bills b ON b.account_no = c.account_no AND b.status <> 'PAID'
WHERE c.account_no = $1
ORDER BY b.period, b.bill_id
FOR UPDATE OF c
"""

# The bills' new paid amounts are the read ones plus the allocation (the guard holds them as read);
# their new status is computed in Python by allocation.bill_status and passed in. Four variants, each
# prepared on its connection when first used: with or without the prepaid credit ($17 <> 0: the
# customer's balance and its ledger line), with or without bills settled (allocations and bill
# updates): every table a statement names is opened, locked and readied for writing at each
# execution, whether a row is written there or not.
_WRITE_PAY = """
WITH guard AS (
  SELECT coalesce((SELECT string_agg(b.bill_id::text || ':' || b.xmin::text, ',' ORDER BY b.bill_id)
                   FROM bills b WHERE b.account_no = $1 AND b.status <> 'PAID'), '') = $4
     AND (SELECT """ + RECONCILED_DAYS.format(day="$5") + """) = $6::int
     AND EXISTS (SELECT 1 FROM bank_links l
                 WHERE l.bank_id = $2 AND l.state = 'SIGNED_OFF' AND l.business_date >= $5::date) = $18
     AS ok
), pay AS (
  INSERT INTO payments (bank_id, bank_serial, state, account_no, branch_code, amount_fen, channel, outlet_code,
                        teller_id, bank_balance_fen, settlement_date, posted_at, arrears_after_fen,
                        prepaid_after_fen, prepaid_added_fen, reversed_at, reversed_on, cancel_serial)
  SELECT $2, $3, 'POSTED', $1, $7, $8::bigint, $9, $10, $11, $12::bigint, $13::date, $14::timestamptz,
         $15::bigint, $16::bigint, $17::bigint, NULL, NULL, NULL
  FROM guard WHERE guard.ok
  RETURNING payment_id
{bills}{credit}), journal AS (
  INSERT INTO journal (at, bank_id, rpc, serial, original_serial, account_no, amount_fen, outcome, payment_id)
  SELECT $14::timestamptz, $2, 'PAY', $3, '', $1, $8::bigint, 'POSTED', pay.payment_id
  FROM pay
)
SELECT payment_id FROM pay
"""
_CREDIT = """), credit AS (
  UPDATE customers c SET prepaid_fen = c.prepaid_fen + $17::bigint
  FROM pay WHERE c.account_no = $1 AND $17::bigint <> 0
), ledger AS (
  INSERT INTO prepaid_ledger (account_no, reason, delta_fen, balance_after_fen, payment_id, bill_id, at)
  SELECT $1, 'PAYMENT', $17::bigint, $16::bigint, pay.payment_id, NULL, $14::timestamptz
  FROM pay WHERE $17::bigint <> 0
"""
_BILLS = """), alloc AS (
  INSERT INTO allocations (payment_id, bill_id, late_fee_fen, principal_fen)
  SELECT pay.payment_id, a.bill_id, a.fee, a.principal
  FROM pay, unnest($19::bigint[], $20::bigint[], $21::bigint[]) WITH ORDINALITY AS a(bill_id, fee, principal, n)
  ORDER BY a.n
), bill_update AS (
  UPDATE bills b SET principal_paid_fen = b.principal_paid_fen + u.principal,
                     late_fee_paid_fen = b.late_fee_paid_fen + u.fee,
                     accrual_micro = u.micro, accrual_date = greatest(b.accrual_date, $5::date),
                     status = u.new_status,
                     paid_on = CASE WHEN u.new_status = 'PAID' THEN $5::date ELSE NULL END
  FROM pay, unnest($19::bigint[], $20::bigint[], $21::bigint[], $22::bigint[], $23::text[])
       AS u(bill_id, fee, principal, micro, new_status)
  WHERE b.bill_id = u.bill_id
"""
# (adds prepaid credit, settles bills) -> WRITE; its parameters are _write_params' first 18, then the
# bills' 5 arrays when it settles bills.
WRITE_PAY = {(credit, bills): _WRITE_PAY.replace("{credit}", _CREDIT if credit else "")
             .replace("{bills}", _BILLS if bills else "") for credit in (False, True) for bills in (False, True)}


class Customer(NamedTuple):
    branch_code: str
    tariff_class: str
    status: str
    prepaid_fen: int
    closed_bits: int               # RECONCILED_DAYS
    taken_id: int | None
    suspended_reason: str | None   # None: the bank is not suspended
    signed_off: bool

    @property
    def closed_today(self) -> bool:
        return bool(self.closed_bits & 1)

    @property
    def closed_next(self) -> bool:
        return bool(self.closed_bits & 2)

    @property
    def suspended(self) -> bool:
        return self.suspended_reason is not None


class Bill(NamedTuple):
    bill_id: int
    period: str
    amount_fen: int
    prepaid_applied_fen: int
    principal_paid_fen: int
    late_fee_paid_fen: int
    accrual_micro: int
    accrual_date: dt.date
    b_version: str


@dataclass(frozen=True)
class PayRead:
    """What READ saw: the customer (None: no such account), its unpaid bills in period order, and
    the versions WRITE's guard compares."""
    customer: Any
    bills: tuple[Any, ...]
    bills_version: str


def _driver(conn: Connection) -> Any:
    return conn.connection.driver_connection


_CURSOR = "yindian_pay_cursor"
_CONTROL = "yindian_pay_control"


def _kept(conn: Connection, raw: Any, key: str) -> psycopg.RawCursor[Any]:
    """A cursor kept for the driver connection's life: a new cursor per statement copies the
    connection's adapters and finds each parameter's dumper again. Kept in the pool's per-connection
    `info` (cleared when the connection is replaced) and checked against the driver connection it
    was made on."""
    info = conn.connection.info
    kept = info.get(key)
    if kept is None or kept.connection is not raw or kept.closed:
        kept = info[key] = psycopg.RawCursor(raw)
    return kept


def _translated(conn: Connection, raw: Any, sql: str, params: Any, exc: psycopg.Error) -> Exception:
    # Leaving pipeline mode fetches what is left after the first error, and the statements the server
    # skipped then raise PipelineAborted over it: the error that counts is the one it replaced.
    while isinstance(exc, psycopg.errors.PipelineAborted) and isinstance(exc.__context__, psycopg.Error):
        exc = exc.__context__
    if raw.closed or raw.broken:
        conn.invalidate()
    return DBAPIError.instance(sql, params, exc, psycopg.Error, connection_invalidated=conn.invalidated)


IN_DOUBT_TEXT = "the database connection broke during COMMIT: the outcome is unknown, ask GetPayment"
_BEGIN = b"BEGIN"
_COMMIT = b"COMMIT"
# A write-free transaction's end waits for no WAL flush (PayTx.end_write_free).
_NO_FLUSH_WAIT = b"SET LOCAL synchronous_commit = off"


class PayTx:
    """One pay's transaction on the connection's psycopg connection in pipeline mode: BEGIN, READ and
    a Sync in one round trip, WRITE, COMMIT and a Sync in another: two round trips a pay instead of
    four (psycopg waits for its own BEGIN and COMMIT each alone, and in pipeline mode syncs after its
    own BEGIN; so the connection is in autocommit while the pay runs and our BEGIN is sent with
    READ; `close` puts it back). Each round trip ends in a Sync, so that the server answers
    ReadyForQuery and arms the transaction's idle bound while Python computes the allocation (after
    a mere Flush it would not: a frozen process would hold the locks unbounded).

    Errors: a statement that fails aborts the rest of its round trip (the server skips to the Sync);
    its error is raised as before, and the transaction, in error, rolls back at `close`. A WRITE that
    fails (a serial taken meanwhile, a timeout) never reaches its COMMIT: not in doubt. A connection
    that breaks while WRITE and COMMIT are out is in doubt: the server may have committed before the
    answer was lost (COMMIT_IN_DOUBT)."""

    __slots__ = ("conn", "raw", "cur", "ctl", "pipe", "pipeline", "open")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.raw = raw = _driver(conn)
        self.cur = _kept(conn, raw, _CURSOR)
        self.ctl = _kept(conn, raw, _CONTROL)  # BEGIN, COMMIT: READ's and WRITE's rows stay on `cur`
        self.pipe: AbstractContextManager[psycopg.Pipeline] | None = None
        self.pipeline: psycopg.Pipeline | None = None
        self.open = False  # our BEGIN was sent, our COMMIT not yet

    def _enter(self) -> psycopg.Pipeline:
        if self.pipe is None:
            if not self.open:
                self.raw.autocommit = True
            mode = self.raw.pipeline()  # psycopg's context manager: leaving it syncs and leaves the mode
            self.pipeline = pipeline = mode.__enter__()
            self.pipe = mode
            return pipeline
        assert self.pipeline is not None
        return self.pipeline

    def _leave(self) -> None:
        """Leaves pipeline mode: sends what is queued and a Sync and waits for all the results (the
        first error raised)."""
        mode, self.pipe = self.pipe, None
        if mode is not None:
            mode.__exit__(None, None, None)

    def read(self, *, account_no: str, bank_id: str, serial: str, day: dt.date, day_key: int, wait_ms: int,
             idle_ms: int) -> PayRead:
        """READ, after BEGIN in the same round trip when no transaction is open (a pay's first READ,
        or the first after a WRITE+COMMIT whose guard failed); alone in the open transaction else."""
        params = (account_no, bank_id, serial, day, str(wait_ms), str(idle_ms), day_key)
        try:
            pipe = self._enter()
            if not self.open:
                self.ctl.execute(_BEGIN)
                self.open = True
            self.cur.execute(READ_FOR_PAY, params, prepare=True)
            pipe.sync()
            rows = self.cur.fetchall()
        except psycopg.Error as exc:
            raise _translated(self.conn, self.raw, READ_FOR_PAY, params, exc) from exc
        return _pay_read(rows)

    def write(self, seen: PayRead, effects: PaymentEffects, *, cmd: Any, day: dt.date, settlement: dt.date,
              now: dt.datetime, commit: bool) -> int | None:
        """The new payment's id, or None when the guard found the account changed since READ.
        `commit`: COMMIT in the same round trip (a failed guard then commits a transaction that wrote
        nothing and released its locks: the caller reads again in a new one)."""
        bills = bool(effects.plan.allocations or effects.bill_updates)
        sql = WRITE_PAY[bool(effects.plan.prepaid_fen), bills]
        params = _write_params(seen, effects, cmd=cmd, day=day, settlement=settlement, now=now, bills=bills)
        try:
            pipe = self._enter()
            self.cur.execute(sql, params, prepare=True)
            if commit:
                self.conn.dispatch.commit(self.conn)  # the engine's "commit" listeners, as conn.commit() calls them
                self.ctl.execute(_COMMIT)
                self.open = False
                self._leave()
            else:
                pipe.sync()
            rows = self.cur.fetchall()
        except psycopg.Error as exc:
            failed = _translated(self.conn, self.raw, sql, params, exc)
            if commit and self.conn.invalidated:
                raise Unavailable(IN_DOUBT_TEXT, reason=COMMIT_IN_DOUBT) from failed
            raise failed from exc
        return int(rows[0][0]) if rows else None

    def call(self, *, cmd: Any, day: dt.date, day_key: int, now: dt.datetime, wait_ms: int,
             rates: Any) -> PayCalled | None:
        """The whole pay in one round trip: CALL_BOUNDS and yd_pay in one implicit transaction (autocommit,
        pipeline mode: the server commits it at the Sync that ends the round trip). None when yd_pay's
        guard found a bill changed (BILL_CHANGED): the transaction rolled back, nothing was written.
        A connection that breaks once the call is sent is in doubt (COMMIT_IN_DOUBT), as WRITE+COMMIT."""
        params = (cmd.account_no, cmd.bank_id, cmd.bank_serial, day, day_key, cmd.amount_fen, cmd.channel,
                  cmd.outlet_code, cmd.teller_id, cmd.bank_balance_fen, now, rates.residential_ppm_per_day,
                  rates.other_current_year_ppm_per_day, rates.other_earlier_years_ppm_per_day, rates.minimum_fen)
        try:
            self._enter()
            self.conn.dispatch.commit(self.conn)  # the engine's "commit" listeners, as conn.commit() calls them
            self.ctl.execute(CALL_BOUNDS, (str(wait_ms),), prepare=True)
            self.cur.execute(PAY_CALL, params, prepare=True)
            self._leave()
            row = self.cur.fetchone()
        except psycopg.Error as exc:
            cause = exc
            while isinstance(cause, psycopg.errors.PipelineAborted) and isinstance(cause.__context__, psycopg.Error):
                cause = cause.__context__
            if cause.sqlstate == BILL_CHANGED:
                return None
            failed = _translated(self.conn, self.raw, PAY_CALL, params, exc)
            if self.conn.invalidated:
                raise Unavailable(IN_DOUBT_TEXT, reason=COMMIT_IN_DOUBT) from failed
            raise failed from exc
        assert row is not None
        return PayCalled._make(row)

    def commit(self) -> None:
        """COMMIT of an open transaction whose WRITE was sent alone."""
        try:
            self._enter()
            self.conn.dispatch.commit(self.conn)
            self.ctl.execute(_COMMIT)
            self.open = False
            self._leave()
        except psycopg.Error as exc:
            failed = _translated(self.conn, self.raw, "COMMIT", (), exc)
            if self.conn.invalidated:
                raise Unavailable(IN_DOUBT_TEXT, reason=COMMIT_IN_DOUBT) from failed
            raise failed from exc

    def pause(self) -> None:
        """Leaves pipeline mode with the transaction open: SQLAlchemy statements follow in it (a
        replay's answer is read with the account still locked, as before)."""
        try:
            self._leave()
        except psycopg.Error as exc:
            raise _translated(self.conn, self.raw, "SYNC", (), exc) from exc

    def end_write_free(self) -> None:
        """Ends a transaction that wrote nothing (a replay answered, a refusal) with COMMIT in one round
        trip, not with the ROLLBACK `close` would send: psycopg forgets every statement it prepared on
        the connection at a ROLLBACK (and sends DEALLOCATE ALL), so the next pays on it would parse and
        plan READ and WRITE again, five times each before they are prepared again.

        READ's row lock gave the transaction an id, so its COMMIT would wait for a WAL flush; it does
        not, with synchronous_commit off for this transaction only. Nothing is lost if a crash loses
        the commit record: the transaction wrote no row (its row lock and advisory lock end with the
        server either way), and a later transaction's synchronous commit flushes the WAL up to its own
        record, past this one. A failure here changes nothing: the caller's answer stands and `close`
        rolls back (a broken connection is invalidated there)."""
        if not self.open:
            return
        with contextlib.suppress(psycopg.Error):
            self._enter()
            self.ctl.execute(_NO_FLUSH_WAIT)
            self.ctl.execute(_COMMIT)
            self._leave()
            self.open = False

    def close(self) -> None:
        """Leaves pipeline mode, rolls back a transaction that did not end, and gives the connection
        back its autocommit off. Never raises; a broken connection is invalidated."""
        raw = self.raw
        with contextlib.suppress(psycopg.Error):
            self._leave()
        try:
            if not (raw.closed or raw.broken):
                if raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    raw.rollback()
                raw.autocommit = False
        except psycopg.Error:
            pass
        if (raw.closed or raw.broken or raw.autocommit) and not self.conn.invalidated:
            self.conn.invalidate()


# ---- one round trip: the function yd_pay (migration 0004_pay_function) ----
# The call's waits bounded (lock and statement timeouts, SET LOCAL) and its plans generic, in a statement
# of their own: statement_timeout is armed when a statement starts, so it bounds the next one.
CALL_BOUNDS = """SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $1, true),
       set_config('plan_cache_mode', 'force_generic_plan', true)"""
PAY_CALL = """SELECT code, payment_id, branch_code, settlement, arrears_after, prepaid_after, refusal, allocs
FROM yd_pay($1::text, $2::text, $3::text, $4::date, $5::bigint, $6::bigint, $7::text, $8::text, $9::text,
            $10::bigint, $11::timestamptz, $12::bigint, $13::bigint, $14::bigint, $15::bigint)"""
# yd_pay's SQLSTATE when a bill it prices changed before its write (the guard): nothing was written.
BILL_CHANGED = "YDP01"


class PayCalled(NamedTuple):
    """yd_pay's answer. code: POSTED, NOT_FOUND, TAKEN (payment_id: the stored payment), SUSPENDED
    (refusal: the reason), CLOSED or DAY_CLOSED; allocs "bill:fee:principal,..." in allocation order."""
    code: str
    payment_id: int | None
    branch_code: str | None
    settlement: dt.date | None
    arrears_after: int | None
    prepaid_after: int | None
    refusal: str | None
    allocs: str | None

    def allocations(self) -> tuple[tuple[int, int, int], ...]:
        if not self.allocs:
            return ()
        return tuple((int(b), int(f), int(p)) for b, f, p in (a.split(":") for a in self.allocs.split(",")))


def _array(items: Iterable[int | str]) -> str:
    """An array literal of integers or status words (no quoting needed), cast by the statement:
    a text parameter costs psycopg far less to send than a list it must type element by element."""
    return "{" + ",".join(map(str, items)) + "}"


def end_write_free(conn: Connection) -> None:
    """Ends a transaction on the pays' pool that wrote nothing (a refusal, a replay answered) on
    PostgreSQL with COMMIT instead of the ROLLBACK the connection's close would send, for the reason
    and with the safety PayTx.end_write_free gives (no WAL flush waited for: nothing was written). A
    failure here changes nothing: the caller's answer stands and the close rolls back (a broken
    connection is invalidated there). Elsewhere: nothing, the close rolls back as before (no prepared
    statements to lose)."""
    if conn.dialect.name != "postgresql" or not conn.in_transaction():
        return
    raw = _driver(conn)
    try:
        raw.execute(_NO_FLUSH_WAIT, prepare=False)
    except psycopg.Error:
        if raw.closed or raw.broken:
            conn.invalidate()
        return
    try:
        conn.commit()
    except DBAPIError:  # SQLAlchemy invalidates a connection that broke
        return


def _pay_read(rows: list[tuple[Any, ...]]) -> PayRead:
    if not rows:
        return PayRead(None, (), "")
    bills = tuple(Bill._make(r[8:]) for r in rows if r[8] is not None)
    version = ",".join(f"{b.bill_id}:{b.b_version}" for b in sorted(bills, key=lambda b: b.bill_id))
    return PayRead(Customer._make(rows[0][:8]), bills, version)


def _write_params(seen: PayRead, effects: PaymentEffects, *, cmd: Any, day: dt.date, settlement: dt.date,
                  now: dt.datetime, bills: bool) -> tuple[Any, ...]:
    """WRITE's parameters: 18, and the bills' 5 arrays when it settles bills (`bills`)."""
    c = seen.customer
    params = (cmd.account_no, cmd.bank_id, cmd.bank_serial, seen.bills_version, day, c.closed_bits, c.branch_code,
              cmd.amount_fen, cmd.channel, cmd.outlet_code, cmd.teller_id, cmd.bank_balance_fen, settlement, now,
              effects.arrears_after_fen, effects.prepaid_after_fen, effects.plan.prepaid_fen, bool(c.signed_off))
    if not bills:
        return params
    allocs, updates = effects.plan.allocations, effects.bill_updates
    return (*params, _array(a.bill_id for a in allocs), _array(a.late_fee_fen for a in allocs),
            _array(a.principal_fen for a in allocs), _array(u.accrual_micro for u in updates),
            _array(u.status for u in updates))


_COMMAND_OK = psycopg.pq.ExecStatus.COMMAND_OK
_TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK
_FATAL_ERROR = psycopg.pq.ExecStatus.FATAL_ERROR


# ---- one round trip on a kept connection (issue 11: no pool checkout, no BEGIN/ROLLBACK, no pipeline) ----
# The call's session on a kept connection: generic plans for yd_pay's statements, set once when the
# connection is opened; its lock and statement bounds are session settings, sent in a round trip of their
# own before a call (stepped down to yindian_common.db.WAIT_STEP_MS) only when the last one sent does not
# fit it (db.kept_wait_fits: longer than the call allows, or WAIT_KEEP_STEPS steps or more shorter).
KEPT_SESSION = "SELECT set_config('plan_cache_mode', 'force_generic_plan', false)"
KEPT_CALL_NAME = b"yd_pay_kept"  # PAY_CALL's prepared name on a kept connection (psycopg's own are _pg3_*)
KEPT_BOUNDS = "SELECT set_config('lock_timeout', $1, false), set_config('statement_timeout', $1, false)"
# A kept connection older than this is closed and replaced, as the pool recycles its own (POOL_RECYCLE_S).
KEPT_RECYCLE_S = float(POOL_RECYCLE_S)


class KeptConnection:
    """A psycopg connection detached from the pays' pool (opened by the pool, with the engine's connect
    arguments and listeners, then no longer counted or returned by it), in autocommit for good, serving
    only yd_pay calls. `bound_ms`: the session's lock and statement bound last sent (None: none yet)."""

    __slots__ = ("fairy", "db", "raw", "cur", "fd", "born", "bound_ms", "encoding", "prepared", "prepared_many")

    def __init__(self, fairy: Any, raw: Any, db: str) -> None:
        self.fairy = fairy
        self.db = db  # the database's metrics label
        self.raw = raw
        raw.autocommit = True
        self.cur = psycopg.RawCursor(raw)
        self.cur.execute(KEPT_SESSION)
        self.fd = raw.pgconn.socket
        self.born = time.monotonic()
        self.bound_ms: int | None = None
        self.encoding = raw.info.encoding
        self.prepared = False  # PAY_CALL prepared as KEPT_CALL_NAME
        self.prepared_many = False  # PAY_MANY_CALL prepared as KEPT_MANY_NAME

    def call_prepared(self, params: tuple[Any, ...], answer_by: float) -> PayCalled:
        """PAY_CALL with `params` straight on libpq: prepared once under KEPT_CALL_NAME, then one
        Bind/Execute/Sync with every parameter in text form and the row read back in text form. psycopg's
        cursor spent about 25 us more per call (adapting 15 parameters and 8 columns by their types,
        its prepared-statement bookkeeping). The round trip is one blocking libpq call (PQexecPrepared),
        during which the interpreter lock is released once; psycopg's non-blocking wait (send, poll,
        read, is-busy) released and took it back at each step, and each taking back could queue behind
        the server's other threads. Bounds: the session's lock and statement timeouts (call_kept), and
        `answer_by` (time.monotonic()) for the answer itself (`_watched`). Raises psycopg's error for
        the result, as its cursor would; a connection lost on the way, or cut at `answer_by`, reads as
        closed (psycopg's `closed` is libpq's status BAD)."""
        pgconn = self.raw.pgconn
        if not self.prepared:
            self._result([self._watched(lambda: pgconn.prepare(KEPT_CALL_NAME, PAY_CALL.encode()), answer_by)],
                         _COMMAND_OK)
            self.prepared = True
        enc = self.encoding
        values = [_text_param(v, enc) for v in params]
        token = db_watch.register(self.fd, answer_by)  # as _watched, inline: it is every pay's round trip
        try:
            res = pgconn.exec_prepared(KEPT_CALL_NAME, values)
        finally:
            db_watch.unregister(token)
        res = self._result([res], _TUPLES_OK)
        return pay_called_of_text([res.get_value(0, i) for i in range(res.nfields)], enc)

    def set_bounds(self, bound_ms: int, answer_by: float) -> None:
        """The session's lock and statement bounds (KEPT_BOUNDS), one round trip; `bound_ms` once it is
        answered (a failed one leaves it unknown: None)."""
        self.bound_ms = None
        pgconn = self.raw.pgconn
        self._result([self._watched(lambda: pgconn.exec_params(KEPT_BOUNDS.encode(), [str(bound_ms).encode()]),
                                    answer_by)], _TUPLES_OK)
        self.bound_ms = bound_ms

    def _watched(self, call: Callable[[], Any], answer_by: float) -> Any:
        """`call` (one blocking libpq round trip on this connection), given up at `answer_by`
        (time.monotonic()): db_watch shuts the socket of a call still waiting then, and libpq reports the
        connection lost (the caller answers in doubt). The round trip itself stays one blocking call: a
        client-side wait of our own (send, select, read) released the interpreter lock three times a pay,
        and cost 2.6 % of the pays per second under bench-ratio."""
        token = db_watch.register(self.fd, answer_by)
        try:
            return call()
        finally:
            db_watch.unregister(token)

    def _result(self, results: list[Any], status: Any) -> Any:
        """The one result of a statement, or its error raised (the first, as psycopg raises it)."""
        for res in results:
            if res.status == _FATAL_ERROR:
                raise_error(self.raw.pgconn, res, self.encoding)
        if len(results) != 1 or results[0].status != status or (status == _TUPLES_OK and results[0].ntuples != 1):
            raise psycopg.errors.InternalError(f"unexpected answer to yd_pay's call: {[r.status for r in results]}")
        return results[0]

    def _result_rows(self, results: list[Any], rows: int) -> Any:
        """The one result of a statement answering `rows` rows, or its error raised (as _result)."""
        for res in results:
            if res.status == _FATAL_ERROR:
                raise_error(self.raw.pgconn, res, self.encoding)
        if len(results) != 1 or results[0].status != _TUPLES_OK or results[0].ntuples != rows:
            raise psycopg.errors.InternalError(f"unexpected answer to yd_pay_many's call: "
                                               f"{[(r.status, r.ntuples) for r in results]}")
        return results[0]

    def call_many_prepared(self, params: list[bytes], rows: int, answer_by: float) -> list[tuple[int, PayCalled]]:
        """PAY_MANY_CALL with `params` (text form) straight on libpq, as call_prepared: (k, answer) per row."""
        pgconn = self.raw.pgconn
        if not self.prepared_many:
            self._result([self._watched(lambda: pgconn.prepare(KEPT_MANY_NAME, PAY_MANY_CALL.encode()), answer_by)],
                         _COMMAND_OK)
            self.prepared_many = True
        res = self._result_rows([self._watched(lambda: pgconn.exec_prepared(KEPT_MANY_NAME, params), answer_by)],
                                rows)
        enc, nfields = self.encoding, res.nfields
        return [(int(res.get_value(r, 0)), pay_called_of_text([res.get_value(r, i) for i in range(1, nfields)], enc))
                for r in range(res.ntuples)]

    def healthy(self, now: float) -> bool:
        """Usable for the next call, without a round trip: not closed or broken, not past its recycle age,
        and nothing to read on its idle socket. A backend that was terminated (pg_terminate_backend, a
        server shutdown) sent its FATAL and closed the socket: readable. A kept connection has nothing
        else unasked to say (no LISTEN, no notices between calls), so readable means discard."""
        raw = self.raw
        if raw.closed or raw.broken or now - self.born > KEPT_RECYCLE_S:
            return False
        try:
            readable, _, _ = select.select((self.fd,), (), (), 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.fairy.close()  # detached: closes the psycopg connection
        with contextlib.suppress(Exception):
            self.raw.close()


class KeptConnections:
    """The pays' kept connections to one PostgreSQL database: at most `size_max` (the pays' pool size: as
    many as the money threads that use it by default), taken and given back LIFO, so that a pay needs no
    pool checkout and check-in, no SQLAlchemy Connection, no BEGIN/ROLLBACK or autocommit switches and no
    pipeline: one Bind/Execute/Sync a pay. Opened on demand; a pay finding none free and `size_max` open
    takes the pool path instead (payments._pay_tx), never waits here.

    A connection goes back only after a call that raised nothing; after any error it is closed (a
    connection is never reused in an unknown state), and one found unhealthy when taken (KeptConnection.
    healthy) is closed and another taken, so a terminated backend fails at most the call in flight on it."""

    def __init__(self, engine: Engine, size_max: int) -> None:
        self.engine = engine
        self.db = db_label(engine)
        self.size_max = size_max
        self._free: list[KeptConnection] = []
        self._open = 0
        self._closed = False
        self._lock = threading.Lock()

    def take(self) -> KeptConnection | None:
        """A healthy kept connection (opened if fewer than size_max are), or None."""
        now = time.monotonic()
        while True:
            try:
                kept = self._free.pop()  # atomic
            except IndexError:
                break
            if kept.healthy(now):
                return kept
            self.discard(kept)
        with self._lock:
            if self._closed or self._open >= self.size_max:
                return None
            self._open += 1
        try:
            fairy = self.engine.raw_connection()
            try:
                raw = fairy.driver_connection
                fairy.detach()
                return KeptConnection(fairy, raw, self.db)
            except psycopg.Error as exc:
                # The session's setup statement met a server that ended the connection (a terminated
                # backend, a restart): database trouble before anything was sent, as the pool's own
                # connect would report it (payments' db_call makes it UNAVAILABLE DB_UNAVAILABLE).
                fairy.invalidate()
                failed = DBAPIError.instance(KEPT_SESSION, None, exc, psycopg.Error, connection_invalidated=True)
                record_db_error(self.db, failed)
                raise failed from exc
            except BaseException:
                fairy.invalidate()
                raise
        except BaseException:
            with self._lock:
                self._open -= 1
            raise

    def give_back(self, kept: KeptConnection) -> None:
        """Keeps `kept` for the next pay, unless the engine was disposed or the connection is not idle
        outside a transaction (it then is closed)."""
        if self._closed or kept.raw.pgconn.transaction_status != _IDLE:
            self.discard(kept)
        else:
            self._free.append(kept)

    def discard(self, kept: KeptConnection) -> None:
        kept.close()
        with self._lock:
            self._open -= 1

    @property
    def open_count(self) -> int:
        return self._open

    def close(self) -> None:
        """Closes the free connections; those in use are closed when given back."""
        self._closed = True
        while True:
            try:
                kept = self._free.pop()
            except IndexError:
                return
            self.discard(kept)


_IDLE = psycopg.pq.TransactionStatus.IDLE
_KEPT: weakref.WeakKeyDictionary[Engine, KeptConnections] = weakref.WeakKeyDictionary()
_KEPT_LOCK = threading.Lock()


def kept_connections(engine: Engine) -> KeptConnections | None:
    """The engine's kept pay connections (made on first use, closed when the engine is disposed), or None
    where a pay must take the pool path: an engine with listeners on "commit" (which the pool path fires
    just before the call, and the kept path cannot) or a pool without a size."""
    found = _KEPT.get(engine)
    if found is not None:
        return None if found.size_max == 0 else found
    with _KEPT_LOCK:
        found = _KEPT.get(engine)
        if found is None:
            size = getattr(engine.pool, "size", None)
            size_max = int(size()) if callable(size) and not engine.dispatch.commit else 0
            found = _KEPT[engine] = KeptConnections(engine, size_max)
            event.listen(engine, "engine_disposed", lambda _engine: found.close())
    return None if found.size_max == 0 else found


def call_kept(kept: KeptConnection, *, cmd: Any, day: dt.date, day_key: int, now: dt.datetime, wait_ms: int,
              rates: Any, answer_by: float | None = None) -> PayCalled | None:
    """PayTx.call on a kept connection: yd_pay alone in one implicit transaction (autocommit), committed at
    the Sync ending its round trip, straight on libpq (KeptConnection.call_prepared); the session's lock and
    statement bounds first, in a round trip of their own, only when the kept ones do not fit the call
    (db.kept_wait_fits). Every answer is awaited until `answer_by` (time.monotonic(); None:
    db.answer_due(wait_ms)) at most.
    Same answers and errors as PayTx.call: None for BILL_CHANGED (rolled back, nothing written); a
    connection broken once the call is sent, or closed for want of an answer by `answer_by`, is in doubt
    (COMMIT_IN_DOUBT). The caller closes the kept connection after any exception and gives it back
    otherwise."""
    if answer_by is None:
        answer_by = answer_due(wait_ms)
    params = (cmd.account_no, cmd.bank_id, cmd.bank_serial, day, day_key, cmd.amount_fen, cmd.channel,
              cmd.outlet_code, cmd.teller_id, cmd.bank_balance_fen, now, rates.residential_ppm_per_day,
              rates.other_current_year_ppm_per_day, rates.other_earlier_years_ppm_per_day, rates.minimum_fen)
    try:
        if not kept_wait_fits(kept.bound_ms, wait_ms):
            kept.set_bounds(stepped_wait_ms(wait_ms), answer_by)
        return kept.call_prepared(params, answer_by)
    except psycopg.Error as exc:
        if exc.sqlstate == BILL_CHANGED:
            return None
        broken = kept.raw.closed or kept.raw.broken  # closed: libpq's status BAD (a call sent straight on it too)
        failed = DBAPIError.instance(PAY_CALL, params, exc, psycopg.Error, connection_invalidated=broken)
        record_db_error(kept.db, failed)  # the pool path's engine counts them in its handle_error listener
        if broken:
            raise Unavailable(IN_DOUBT_TEXT, reason=COMMIT_IN_DOUBT) from failed
        raise failed from exc


def _text_param(value: Any, encoding: str) -> bytes | None:
    """A parameter in PostgreSQL's text form (PAY_CALL casts every one): str, int, date, aware datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode(encoding)
    if isinstance(value, dt.date):  # date and datetime (aware: the offset goes with it)
        return value.isoformat().encode()
    return str(int(value)).encode()


# PayCalled's fields from yd_pay's OUT columns in text form: text, bigint, text, date, bigint, bigint, text, text.
_TEXT, _INT, _DATE = 0, 1, 2
PAY_CALLED_TYPES = (_TEXT, _INT, _TEXT, _DATE, _INT, _INT, _TEXT, _TEXT)


def pay_called_of_text(values: list[bytes | None], encoding: str) -> PayCalled:
    """yd_pay's row in text form as PayCalled, equal to what psycopg's cursor loads (tests hold them equal)."""
    out: list[Any] = []
    for kind, v in zip(PAY_CALLED_TYPES, values, strict=True):
        if v is None:
            out.append(None)
        elif kind == _INT:
            out.append(int(v))
        elif kind == _DATE:
            out.append(dt.date.fromisoformat(v.decode()))
        else:
            out.append(v.decode(encoding))
    return PayCalled._make(out)


# ---- several pays in one call and one commit: yd_pay_many (migration 0004_paybatch_pay_many) ----
# mis_adapter.pay_batch groups the pays waiting at the same moment; each is yd_pay's own call inside.
PAY_MANY_CALL = """SELECT k, code, payment_id, branch_code, settlement, arrears_after, prepaid_after, refusal, allocs
FROM yd_pay_many($1::text[], $2::text[], $3::text[], $4::date[], $5::bigint[], $6::bigint[], $7::text[],
                 $8::text[], $9::text[], $10::bigint[], $11::timestamptz[], $12::bigint, $13::bigint, $14::bigint,
                 $15::bigint)"""
KEPT_MANY_NAME = b"yd_pay_many_kept"  # PAY_MANY_CALL's prepared name on a kept connection


class BatchPay(NamedTuple):
    """One pay of a batch: what yd_pay takes besides the late-fee rates."""
    cmd: Any
    day: dt.date
    day_key: int
    now: dt.datetime


class BatchFailed(Exception):
    """yd_pay_many raised (a bill changed under a pay, a lock or statement timeout, a serial inserted
    concurrently, a deadlock...): the server rolled the whole call back, nothing of the batch was
    written, and the connection answered. Each pay is to be called again alone."""


def array_text(values: Iterable[Any], encoding: str) -> bytes:
    """A PostgreSQL array of `values` in text form (the call casts it): NULL for None, str quoted (any
    character but NUL), date and aware datetime as ISO text, integers as digits."""
    parts = []
    for v in values:
        if v is None:
            parts.append("NULL")
        elif isinstance(v, str):
            parts.append('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"')
        elif isinstance(v, dt.date):  # date and datetime (aware: the offset goes with it)
            parts.append('"' + v.isoformat() + '"')
        else:
            parts.append(str(int(v)))
    return ("{" + ",".join(parts) + "}").encode(encoding)


def pay_many_params(pays: list[BatchPay], rates: Any, encoding: str) -> list[bytes]:
    """PAY_MANY_CALL's parameters in text form: the pays' 11 arrays, then the 4 rates."""
    cmds = [p.cmd for p in pays]
    arrays = ([c.account_no for c in cmds], [c.bank_id for c in cmds], [c.bank_serial for c in cmds],
              [p.day for p in pays], [p.day_key for p in pays], [c.amount_fen for c in cmds],
              [c.channel for c in cmds], [c.outlet_code for c in cmds], [c.teller_id for c in cmds],
              [c.bank_balance_fen for c in cmds], [p.now for p in pays])
    scalars = (rates.residential_ppm_per_day, rates.other_current_year_ppm_per_day,
               rates.other_earlier_years_ppm_per_day, rates.minimum_fen)
    return [array_text(a, encoding) for a in arrays] + [str(int(v)).encode() for v in scalars]


def call_kept_many(kept: KeptConnection, pays: list[BatchPay], *, wait_ms: int, rates: Any,
                   answer_by: float | None = None) -> list[PayCalled]:
    """yd_pay_many for `pays` on a kept connection, in one implicit transaction committed at the Sync ending
    its round trip (the bounds first only when the kept ones do not fit, and every answer awaited until
    `answer_by` at most, as call_kept):
    yd_pay's answer for each pay, in the order of `pays`. Raises BatchFailed when the server rolled the call
    back (the connection answered: nothing written), Unavailable COMMIT_IN_DOUBT when the connection broke
    once the call was sent, or was closed for want of an answer (the batch may have committed). The caller
    closes the kept connection after any exception and gives it back otherwise."""
    if answer_by is None:
        answer_by = answer_due(wait_ms)
    params = pay_many_params(pays, rates, kept.encoding)
    raw = kept.raw
    try:
        if not kept_wait_fits(kept.bound_ms, wait_ms):
            kept.set_bounds(stepped_wait_ms(wait_ms), answer_by)
        answers = kept.call_many_prepared(params, len(pays), answer_by)
    except psycopg.Error as exc:
        broken = raw.closed or raw.broken
        failed = DBAPIError.instance(PAY_MANY_CALL, None, exc, psycopg.Error, connection_invalidated=broken)
        if broken:
            record_db_error(kept.db, failed)
            raise Unavailable(IN_DOUBT_TEXT, reason=COMMIT_IN_DOUBT) from failed
        raise BatchFailed(str(exc)) from failed
    by_k = dict(answers)
    if len(by_k) != len(pays) or set(by_k) != set(range(1, len(pays) + 1)):
        raise RuntimeError(f"yd_pay_many answered pays {sorted(by_k)} of {len(pays)}")  # a bug: loud
    return [by_k[k] for k in range(1, len(pays) + 1)]
