"""The bill feed's storage and settlement (DESIGN.md Money semantics 7):
the outbox and its gapless per-bank seq, the subscriber's cursor, the
one-stream-per-bank lease, and how a batch of the bank's debit results is
applied — set-based, in one transaction with the cursor it advances.

Rules this module keeps:
- A seq is taken by incrementing the bank's counter row (`feed_sequences`)
  in the SAME transaction that issues the bill; the row lock serializes
  issuers, so seqs are gapless and ordered as their transactions commit.
- The cursor (`acked_through_seq`) only advances over seqs that have a
  stored result, and is written in the transaction that stores them.
- A DEBITED result posts one AUTO_DEBIT payment keyed by (bank, bank_serial).
  The bulk path takes the debits for which the allocation rule
  (`allocation.bills_due` + `allocate_payment`, asked per debit) gives one
  allocation of the whole amount to the principal of the account's only
  unpaid bill, and writes exactly that allocation in bulk; every other
  debit is posted in the same transaction by Pay's own writes
  (`payments.pay_in_tx`, called from here, never through the gRPC edge),
  which allocate oldest first, late fee before principal, rest to prepaid.
  A debit for a bill already settled by another channel becomes prepaid
  credit and is listed in `feed_refunds`; so is any surplus the general
  path turned into prepaid credit.
- INSUFFICIENT_FUNDS marks the bill for dunning; the bill stays in arrears.

One database at a time: the outbox lives in the database of the bills it
announces, and a bank's seq space here is per database. With branch
databases, mis_adapter.feed_branches numbers every branch's outbox into one
global sequence per bank at the front and applies each result here, in its
bill's own database. Nothing here speaks gRPC or builds protos."""
from __future__ import annotations

import datetime as dt
import gc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import starmap
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from mis_adapter import agreements, payments
from mis_adapter import refunds as refunds_
from mis_adapter.allocation import allocate_payment, bills_due
from mis_adapter.banks import lock_bank_day, settlement_day
from mis_adapter.db.base import table_of
from mis_adapter.db.core import AllocationRow, BillRow, Customer, JournalEntry, Payment, PrepaidEntry
from mis_adapter.db.feed import DebitResultRow, FeedCursor, FeedLease, FeedSequence, OutboxRow, RefundRow
from mis_adapter.late_fee import LateFeeRates
from yindian_common import business_metrics
from yindian_common.bulk_sql import InList, _pg_type, bulk_insert, list_param
from yindian_common.clock import business_date
from yindian_common.crash_points import crash_point
from yindian_common.errors import (
    AccountClosed,
    AccountNotFound,
    FeedBusy,
    FeedMultiDatabase,
    SerialConflict,
)

__all__ = [
    "FeedSettings", "Notice", "DebitIn", "ApplyReport", "FeedBusy", "FeedMultiDatabase", "NOTIFY_CHANNEL",
    "reading", "raise_gc_threshold", "take_seqs", "insert_outbox", "insert_columns", "list_of", "notify_banks", "read_notices", "get_cursor", "stored_results",
    "answered_high",
    "acquire_lease", "renew_lease", "release_lease", "apply_results", "DEBITED", "INSUFFICIENT_FUNDS",
]

NOTIFY_CHANNEL = "yindian_feed"
DEBITED = "DEBITED"
INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
NOT_DEBITED = agreements.NOT_DEBITED  # the answer to a withdrawn notice: nothing moved
AUTO_DEBIT = "AUTO_DEBIT"


@dataclass(frozen=True)
class FeedSettings:
    """Every bound of the feed, named. mis_adapter's AdapterSettings carries
    the same fields prefixed `feed_`; `from_adapter_settings` reads them."""
    window_max: int = 20_000         # notices sent and not yet acknowledged (contiguously)
    notice_batch_max: int = 2_500    # notices per stream message
    results_batch_max: int = 5_000   # results accepted in one message
    apply_batch_max: int = 10_000    # results of queued messages posted in one transaction
    results_queue_max: int = 8       # result messages received and waiting to be posted
    apply_partitions: int = 2        # PostgreSQL: connections posting a batch's results at once, split by account
    heartbeat_s: float = 5.0         # a heartbeat at least this often; lease renewed with it
    poll_interval_s: float = 0.2     # fallback wake-up when no LISTEN/NOTIFY (SQLite, lost listener)
    lease_ttl_s: float = 15.0        # a stream's lease lapses this long after its last renewal
    peer_silence_s: float = 120.0    # notices outstanding and no result for this long: stream ended
    listen_retry_s: float = 1.0      # PostgreSQL listener reconnect back-off
    gc_gen0_threshold: int = 20_000  # young objects between garbage collections in a feeding process (raise_gc_threshold)

    def __post_init__(self) -> None:
        if min(self.window_max, self.notice_batch_max, self.results_batch_max, self.apply_batch_max,
               self.results_queue_max, self.apply_partitions, self.gc_gen0_threshold) < 1:
            raise ValueError("feed window and batch sizes must be positive")
        if self.heartbeat_s <= 0 or self.poll_interval_s <= 0 or self.lease_ttl_s <= self.heartbeat_s:
            raise ValueError("feed intervals must be positive and the lease must outlive a heartbeat")

    @classmethod
    def from_adapter_settings(cls, s: object) -> FeedSettings:
        kw = {}
        for name in cls.__dataclass_fields__:
            value = getattr(s, "feed_" + name, None)
            if value is not None:
                kw[name] = value
        return cls(**kw)


class Notice(NamedTuple):
    """One bill notice. A named tuple, not a frozen dataclass: a stream builds one per notice it reads and
    holds it in its window (a frozen dataclass's field-by-field __init__ cost 1.3 against 0.35 µs)."""
    seq: int
    bill_id: int
    account_no: str
    period: str
    kwh: int
    amount_fen: int
    due_date: dt.date
    issued_at: dt.datetime
    # the account's agreement ended before a result: to be answered NOT_DEBITED (mis_adapter.agreements)
    withdrawn: bool = False


class DebitIn(NamedTuple):
    """A validated result joined with the notice it answers (a named tuple, built per result: see Notice;
    a batch's columns are taken by one transposition, `zip(*results)`)."""
    seq: int
    outcome: str
    bank_serial: str
    amount_fen: int
    bill_id: int
    account_no: str


@dataclass
class ApplyReport:
    paid: int = 0            # bills settled by their debit (bulk path)
    posted: int = 0          # debits posted through the general payment path
    refunds: int = 0         # debits (or parts) listed for refund
    dunning: int = 0
    dispositions: dict[int, str] = field(default_factory=dict)


T_SEQ = table_of(FeedSequence)
T_OUT = table_of(OutboxRow)
T_CUR = table_of(FeedCursor)
T_LEASE = table_of(FeedLease)
T_RES = table_of(DebitResultRow)
T_REF = table_of(RefundRow)
T_BILLS = table_of(BillRow)
T_CUST = table_of(Customer)
T_PAY = table_of(Payment)
T_ALLOC = table_of(AllocationRow)
T_JOURNAL = table_of(JournalEntry)
T_PREPAID = table_of(PrepaidEntry)

_b = sa.bindparam


def _utc(when: dt.datetime) -> dt.datetime:
    # SQLite keeps no offset: store every instant in UTC so that they compare.
    return when.astimezone(dt.UTC)


def raise_gc_threshold(gen0: int) -> None:
    """Lets `gen0` young objects (CPython's default: 700) accumulate between garbage collections, in
    this process, from now on. Issuing and posting build and drop a few objects per row of 5,000-row
    batches (rows, parameters, protos), which die young and make no cycles; at the default, the
    collector's young passes and the older generations' scans they set off took 20-45 % of the feed's
    Python CPU (measured: 9.8 of 21 us per bill issued, 8.0 of 36 per bill posted; 2.8 and 0.1 at
    20,000). Only ever raised, never lowered: at most `gen0` more objects wait for their collection."""
    g0, g1, g2 = gc.get_threshold()
    if g0 < gen0:
        gc.set_threshold(gen0, g1, g2)


# ---- sequence and outbox (called inside the issuing transaction) ----

_SEQ_BUMP = T_SEQ.update().where(T_SEQ.c.bank_id == _b("p_bank")).values(
    last_seq=T_SEQ.c.last_seq + _b("n"))
_SEQ_READ = sa.select(T_SEQ.c.last_seq).where(T_SEQ.c.bank_id == _b("bank_id"))


def _insert_ignore(conn: Connection, table: sa.Table, values: dict[str, object]) -> None:
    name = conn.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        conn.execute(pg_insert(table).values(**values).on_conflict_do_nothing())
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        conn.execute(sqlite_insert(table).values(**values).on_conflict_do_nothing())
    else:
        conn.execute(table.insert().prefix_with("IGNORE").values(**values))


def take_seqs(conn: Connection, bank_id: str, n: int) -> int:
    """Reserves n consecutive seqs for `bank_id` and returns the first. The
    counter row stays locked until the caller's transaction ends."""
    if n < 1:
        raise ValueError("take_seqs needs n >= 1")
    if conn.execute(_SEQ_BUMP, {"p_bank": bank_id, "n": n}).rowcount != 1:
        _insert_ignore(conn, T_SEQ, {"bank_id": bank_id, "last_seq": 0})
        if conn.execute(_SEQ_BUMP, {"p_bank": bank_id, "n": n}).rowcount != 1:
            raise RuntimeError(f"feed sequence row for {bank_id} vanished")
    last = int(conn.execute(_SEQ_READ, {"bank_id": bank_id}).scalar_one())
    return last - n + 1


def insert_outbox(conn: Connection, bank_id: str, first_seq: int, shared: dict[str, Any],
                  columns: dict[str, list[Any]]) -> None:
    """Writes n notices at first_seq, first_seq+1, ...: OutboxRow columns without bank_id/seq, as values
    shared by every notice and one list per column (see insert_columns)."""
    n = len(next(iter(columns.values())))
    if n:
        insert_columns(conn, T_OUT, {**shared, "bank_id": bank_id},
                        {**columns, "seq": list(range(first_seq, first_seq + n))})


def notify_banks(conn: Connection, bank_ids: Iterable[str]) -> None:
    """PostgreSQL delivers these at commit to every listening replica."""
    if conn.dialect.name != "postgresql":
        return
    for bank_id in sorted(set(bank_ids)):
        conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, bank_id)))


# ---- reading the outbox, the cursor, stored results ----

_READ_NOTICES = (sa.select(T_OUT.c.seq, T_OUT.c.bill_id, T_OUT.c.account_no, T_OUT.c.period, T_OUT.c.kwh,
                           T_OUT.c.amount_fen, T_OUT.c.due_date, T_OUT.c.issued_at)
                 .where(T_OUT.c.bank_id == _b("bank_id"), T_OUT.c.seq > _b("after"))
                 .order_by(T_OUT.c.seq).limit(_b("limit")))
_CURSOR = sa.select(T_CUR.c.acked_through_seq).where(T_CUR.c.bank_id == _b("bank_id"))
_LAST_SEQ = _SEQ_READ


# PostgreSQL: the same read straight through psycopg, in binary (read_notices).
_PG_READ_NOTICES = ("SELECT seq, bill_id, account_no, period, kwh, amount_fen, due_date, issued_at FROM feed_outbox "
                    "WHERE bank_id = %s AND seq > %s ORDER BY seq LIMIT %s")


def read_notices(conn: Connection, bank_id: str, after_seq: int, limit: int) -> list[Notice]:
    """The bank's next notices after `after_seq`, at most `limit`. On PostgreSQL the rows come straight from
    psycopg, in this connection's transaction, in binary, and are made Notices by `starmap` (in C): 2.1-2.4
    against 3.8-4.2 µs of CPU per notice through SQLAlchemy's result rows and a Notice built from each
    (2,500 notices, best of 15, loaded box); that read was a sixth of mis_adapter's GIL samples under bench-feed."""
    out: list[Notice]
    if conn.dialect.name == "postgresql":
        with conn.connection.driver_connection.cursor(binary=True) as cur:  # type: ignore[union-attr]
            cur.execute(_PG_READ_NOTICES, (bank_id, after_seq, limit))
            out = list(starmap(Notice, cur.fetchall()))
    else:
        # Positional: the select's columns are Notice's fields in order (a named read per field cost more).
        out = [Notice(*r) for r in conn.execute(_READ_NOTICES, {"bank_id": bank_id, "after": after_seq,
                                                                "limit": limit}).all()]
    if not out:
        return out
    # Gapless by construction; a hole here is a bug, never skipped silently. The seqs are distinct and in
    # order (the key, ORDER BY), so the first and the last seq name every one between.
    if out[0].seq != after_seq + 1 or out[-1].seq != after_seq + len(out):
        seq = next((n.seq for i, n in enumerate(out) if n.seq != after_seq + 1 + i), out[0].seq)
        raise RuntimeError(f"feed outbox of {bank_id} has a gap before seq {seq}")
    withdrawn = agreements.withdrawn_among(conn, bank_id, range(after_seq + 1, after_seq + 1 + len(out)))
    if withdrawn:
        out = [n._replace(withdrawn=True) if n.seq in withdrawn else n for n in out]
    return out


def reading(engine: Engine) -> Connection:
    """A read-only connection: on SQLite a plain BEGIN, so readers never queue behind writers."""
    return engine.connect().execution_options(read_only=True)


def get_cursor(conn: Connection, bank_id: str) -> int:
    return int(conn.execute(_CURSOR, {"bank_id": bank_id}).scalar_one_or_none() or 0)


def last_seq(conn: Connection, bank_id: str) -> int:
    return int(conn.execute(_LAST_SEQ, {"bank_id": bank_id}).scalar_one_or_none() or 0)


_ANSWERED_HIGH = sa.select(sa.func.max(T_RES.c.seq)).where(T_RES.c.bank_id == _b("bank_id"))


def answered_high(conn: Connection, bank_id: str) -> int:
    """The highest seq with a stored result (0: none); above it nothing was answered."""
    return int(conn.execute(_ANSWERED_HIGH, {"bank_id": bank_id}).scalar_one_or_none() or 0)


_STORED = (sa.select(T_RES.c.seq, T_RES.c.outcome, T_RES.c.bank_serial, T_RES.c.amount_fen)
           .where(T_RES.c.bank_id == _b("bank_id"), InList(T_RES.c.seq, "seqs")))


def stored_results(conn: Connection, bank_id: str, seqs: Sequence[int]) -> dict[int, tuple[str, str, int]]:
    if not seqs:
        return {}
    rows = conn.execute(_STORED, {"bank_id": bank_id, "seqs": list_of(conn, seqs)}).all()
    return {r.seq: (r.outcome, r.bank_serial, r.amount_fen) for r in rows}


_NOTICES_BY_SEQ = (sa.select(T_OUT.c.seq, T_OUT.c.bill_id, T_OUT.c.account_no, T_OUT.c.amount_fen)
                   .where(T_OUT.c.bank_id == _b("bank_id"), InList(T_OUT.c.seq, "seqs")))


def notices_by_seq(conn: Connection, bank_id: str, seqs: Sequence[int]) -> dict[int, tuple[int, str, int]]:
    if not seqs:
        return {}
    rows = conn.execute(_NOTICES_BY_SEQ, {"bank_id": bank_id, "seqs": list_of(conn, seqs)}).all()
    return {r.seq: (r.bill_id, r.account_no, r.amount_fen) for r in rows}


# ---- the one-stream-per-bank lease ----

_LEASE_TAKE = T_LEASE.update().where(
    T_LEASE.c.bank_id == _b("p_bank"),
    sa.or_(T_LEASE.c.holder == _b("p_holder"), T_LEASE.c.expires_at < _b("p_now"))).values(
    holder=_b("p_holder"), acquired_at=_b("p_now"), expires_at=_b("p_expires"))
_LEASE_RENEW = T_LEASE.update().where(T_LEASE.c.bank_id == _b("p_bank"), T_LEASE.c.holder == _b("p_holder")).values(
    expires_at=_b("p_expires"))
_LEASE_RELEASE = T_LEASE.delete().where(T_LEASE.c.bank_id == _b("p_bank"), T_LEASE.c.holder == _b("p_holder"))
_LEASE_HOLDER = sa.select(T_LEASE.c.holder, T_LEASE.c.expires_at).where(T_LEASE.c.bank_id == _b("bank_id"))


# Times a stream tries to take the bank's lease when the holder lets it go mid-attempt (see acquire_lease).
LEASE_TAKE_ATTEMPTS = 3


def acquire_lease(engine: Engine, bank_id: str, holder: str, now: dt.datetime, ttl_s: float) -> None:
    """Takes the bank's lease, or raises FeedBusy when another live stream holds it.

    The holder's row may be released between our insert (which its row made a no-op) and our read of
    it: a stream ending as the bank's next one starts. Each statement sees what committed before it
    (READ COMMITTED), so the read then finds no lease at all; that attempt is repeated, at most
    LEASE_TAKE_ATTEMPTS times, after which the stream is refused as busy (ABORTED, never UNKNOWN)."""
    now = _utc(now)
    expires = now + dt.timedelta(seconds=ttl_s)
    params = {"p_bank": bank_id, "p_holder": holder, "p_now": now, "p_expires": expires}
    for _ in range(LEASE_TAKE_ATTEMPTS):
        with engine.begin() as conn:
            if conn.execute(_LEASE_TAKE, params).rowcount == 1:
                return
            _insert_ignore(conn, T_LEASE, {"bank_id": bank_id, "holder": holder, "acquired_at": now,
                                           "expires_at": expires})
            row = conn.execute(_LEASE_HOLDER, {"bank_id": bank_id}).first()
        if row is None:
            continue  # released by its holder after our insert: take it again
        if row.holder != holder:
            raise FeedBusy(f"bank {bank_id} already has an active bill feed stream; "
                           "it is refused until that stream ends or its lease lapses")
        return
    raise FeedBusy(f"bank {bank_id}'s bill feed lease changed hands {LEASE_TAKE_ATTEMPTS} times while this "
                   "stream tried to take it; it is refused, try again")


def renew_lease(engine: Engine, bank_id: str, holder: str, now: dt.datetime, ttl_s: float) -> bool:
    """False when the lease was lost (lapsed and taken): the stream must end."""
    with engine.begin() as conn:
        n = conn.execute(_LEASE_RENEW, {"p_bank": bank_id, "p_holder": holder,
                                        "p_expires": _utc(now) + dt.timedelta(seconds=ttl_s)}).rowcount
    return n == 1


def release_lease(engine: Engine, bank_id: str, holder: str) -> None:
    with engine.begin() as conn:
        conn.execute(_LEASE_RELEASE, {"p_bank": bank_id, "p_holder": holder})


# ---- applying a batch of results ----

_LOCK_CUSTOMERS = (sa.select(T_CUST.c.account_no, T_CUST.c.prepaid_fen, T_CUST.c.status, T_CUST.c.tariff_class,
                             T_CUST.c.branch_code)
                   .where(InList(T_CUST.c.account_no, "accts"))
                   .order_by(T_CUST.c.account_no).with_for_update())
# The fields _SettlesMemo's answer depends on are consecutive, from period to late_fee_paid_fen (_MEMO_FIELDS).
_BILL_COLUMNS = sa.select(T_BILLS.c.bill_id, T_BILLS.c.account_no, T_BILLS.c.status, T_BILLS.c.period,
                          T_BILLS.c.amount_fen, T_BILLS.c.prepaid_applied_fen, T_BILLS.c.principal_paid_fen,
                          T_BILLS.c.accrual_micro, T_BILLS.c.accrual_date, T_BILLS.c.late_fee_paid_fen)
_MEMO_FIELDS = slice(3, 10)
_BILLS = _BILL_COLUMNS.where(InList(T_BILLS.c.bill_id, "ids"))
# The batch accounts' unpaid bills and the batch's bills (feed._batch_bills).
_BILLS_OF_ACCOUNTS = _BILL_COLUMNS.where(InList(T_BILLS.c.account_no, "accts"),
                                        sa.or_(T_BILLS.c.status != "PAID", InList(T_BILLS.c.bill_id, "ids")))
# PostgreSQL: the same read as one index probe per account (a LATERAL subquery that OFFSET 0 keeps from
# being flattened into a join). Given the 5,000 accounts of a batch as `= ANY`, PostgreSQL read every bill
# of the table instead (a sequential scan, whatever the statistics, up to about 5 % of the table: 100,000
# bills; the scan grows with the table, the probes with the batch).
_PG_BILLS_OF_ACCOUNTS = (
    "SELECT b.bill_id, b.account_no, b.status, b.period, b.amount_fen, b.prepaid_applied_fen, "
    "b.principal_paid_fen, b.accrual_micro, b.accrual_date, b.late_fee_paid_fen "
    "FROM unnest(%(accts)s::text[]) AS a(acct) CROSS JOIN LATERAL ("
    "SELECT bill_id, account_no, status, period, amount_fen, prepaid_applied_fen, principal_paid_fen, "
    "accrual_micro, accrual_date, late_fee_paid_fen FROM bills "
    "WHERE account_no = a.acct AND (status <> 'PAID' OR bill_id = ANY(%(ids)s::bigint[])) OFFSET 0) AS b")
_PRINCIPAL_DUE = T_BILLS.c.amount_fen - T_BILLS.c.prepaid_applied_fen - T_BILLS.c.principal_paid_fen
_UNPAID_BY_ACCOUNT = (sa.select(T_BILLS.c.account_no, sa.func.count().label("n"),
                                sa.func.sum(_PRINCIPAL_DUE).label("due"))
                      .where(InList(T_BILLS.c.account_no, "accts"), T_BILLS.c.status != "PAID")
                      .group_by(T_BILLS.c.account_no))
_PAYMENTS_BY_SERIAL = (sa.select(T_PAY.c.payment_id, T_PAY.c.bank_serial, T_PAY.c.account_no, T_PAY.c.amount_fen,
                                 T_PAY.c.state, T_PAY.c.prepaid_added_fen)
                       .where(T_PAY.c.bank_id == _b("bank_id"),
                              InList(T_PAY.c.bank_serial, "serials")))
_SETTLE_BILLS = (T_BILLS.update().where(InList(T_BILLS.c.bill_id, "ids"))
                 .values(principal_paid_fen=T_BILLS.c.amount_fen - T_BILLS.c.prepaid_applied_fen,
                         status="PAID", paid_on=_b("today"), dunning=False))
_DUN_BILLS = (T_BILLS.update().where(InList(T_BILLS.c.bill_id, "ids"), T_BILLS.c.status != "PAID")
              .values(dunning=True))
_ADD_PREPAID = (T_CUST.update().where(T_CUST.c.account_no == _b("acct"))
                .values(prepaid_fen=T_CUST.c.prepaid_fen + _b("delta")))
_UPSERT_CURSOR_UPDATE = (T_CUR.update()
                         .where(T_CUR.c.bank_id == _b("p_bank"), T_CUR.c.acked_through_seq < _b("p_seq"))
                         .values(acked_through_seq=_b("p_seq"), updated_at=_b("p_now")))


@dataclass
class _Plan:
    fast: list[DebitIn] = field(default_factory=list)
    surplus: list[DebitIn] = field(default_factory=list)
    general: list[DebitIn] = field(default_factory=list)
    earlier: list[tuple[DebitIn, int, int]] = field(default_factory=list)  # (result, payment_id, prepaid_added)
    reversed_: list[DebitIn] = field(default_factory=list)
    dunning: list[DebitIn] = field(default_factory=list)
    no_arrears: list[DebitIn] = field(default_factory=list)
    withdrawn: list[DebitIn] = field(default_factory=list)


def _classify(conn: Connection, bank_id: str, results: Sequence[DebitIn], fee_day: dt.date,
              rates: LateFeeRates, accounts: dict[str, Any], *, read_serials: bool = True) -> _Plan:
    """Sorts the results by what posting does with them. `read_serials=False` takes every debit's serial
    as new without reading the payments (see apply_results: a serial that is not is refused by the unique
    key when its payment is written, and the batch is classified again with the read)."""
    plan = _Plan()
    debits = [r for r in results if r.outcome == DEBITED]
    # Each read fetched whole (`.all()`): iterating a result fetches row by row, which cost more than the rule.
    existing = {row.bank_serial: row for row in conn.execute(
        _PAYMENTS_BY_SERIAL, {"bank_id": bank_id, "serials": list_of(conn, [r.bank_serial for r in debits])}
    ).all()} if debits and read_serials else {}
    bills, unpaid = _batch_bills(conn, results)
    settles = _SettlesMemo(fee_day, rates)
    per_account: dict[str, int] = {}
    for r in debits:
        if r.bank_serial not in existing:
            per_account[r.account_no] = per_account.get(r.account_no, 0) + 1
    for i, r in enumerate(results):
        bill = bills.get(r.bill_id)
        if bill is None:
            raise RuntimeError(f"bill {r.bill_id} of feed seq {r.seq} is missing")
        if r.outcome == INSUFFICIENT_FUNDS:
            (plan.no_arrears if bill.status == "PAID" else plan.dunning).append(r)
            continue
        if r.outcome == NOT_DEBITED:
            plan.withdrawn.append(r)
            continue
        prior = existing.get(r.bank_serial)
        if prior is not None:
            if prior.account_no != r.account_no or prior.amount_fen != r.amount_fen:
                raise SerialConflict(f"results[{i}].bank_serial {r.bank_serial} was used for another payment",
                                     field=f"results[{i}].bank_serial")
            if prior.state == "POSTED":
                plan.earlier.append((r, prior.payment_id, prior.prepaid_added_fen))
            else:
                plan.reversed_.append(r)
            continue
        if bill.status == "PAID":
            plan.surplus.append(r)
        elif (unpaid.get(r.account_no) == 1 and per_account[r.account_no] == 1
              and (acct := accounts.get(r.account_no)) is not None and acct.status == "OPEN"
              and settles(r, bill, acct.tariff_class)):
            plan.fast.append(r)
        else:
            plan.general.append(r)
    return plan


def _batch_bills(conn: Connection, results: Sequence[DebitIn]) -> tuple[dict[int, Any], dict[str, int]]:
    """The batch's bills by id, and how many unpaid bills each of the batch's accounts has, from one
    read of the accounts' unpaid bills and the batch's own: one scan by account where a read by bill id
    and a count by account took 47 + 69 ms of a 5,000-result transaction's 590 (measured; 51 ms after).
    A batch bill the account read did not find (a notice naming another account's bill) is read by id."""
    ids = {r.bill_id for r in results}
    bills: dict[int, Any] = {}
    unpaid: dict[str, int] = {}
    params = {"accts": list_of(conn, sorted({r.account_no for r in results})), "ids": list_of(conn, sorted(ids))}
    read = (conn.exec_driver_sql(_PG_BILLS_OF_ACCOUNTS, params) if conn.dialect.name == "postgresql"
            else conn.execute(_BILLS_OF_ACCOUNTS, params))
    for row in read.all():
        if row[2] != "PAID":  # by position (bill_id, account_no, status: _BILL_COLUMNS), once per row read
            unpaid[row[1]] = unpaid.get(row[1], 0) + 1
        if row[0] in ids:
            bills[row[0]] = row
    if len(bills) < len(ids):
        missing = sorted(ids - bills.keys())
        bills.update((row.bill_id, row) for row in conn.execute(_BILLS, {"ids": list_of(conn, missing)}).all())
    return bills, unpaid


class _SettlesMemo:
    """`_settles_bill` asked once per distinct input within a batch: its answer depends only on
    the debit's amount, the tariff class and the bill's money fields below (not on ids or
    accounts), and a month's bills repeat the same few amounts and states. The rule ran per
    debit was the largest share of posting a batch."""

    def __init__(self, fee_day: dt.date, rates: LateFeeRates) -> None:
        self.fee_day = fee_day
        self.rates = rates
        self.known: dict[tuple[Any, ...], bool] = {}

    def __call__(self, r: DebitIn, bill: Any, tariff_class: str) -> bool:
        if bill.accrual_micro == 0 and self.fee_day <= bill.accrual_date:
            # Nothing accrued and nothing accruing by the fee day (late_fee.accrued_micro is 0 up to the accrual
            # date): no fee is due and the accrual stays 0, so the rule's one allocation of the whole debit to
            # principal is exactly a debit of the principal due. A month's bills fed before their due date
            # all take this branch (the rule per distinct amount was most of classifying a batch).
            due = bill.amount_fen - bill.prepaid_applied_fen - bill.principal_paid_fen
            return bool(r.amount_fen == due > 0)
        # (period, amount_fen, prepaid_applied_fen, principal_paid_fen, accrual_micro, accrual_date,
        # late_fee_paid_fen) by one slice of the row: nine reads by name were most of the memo's cost
        key = (r.amount_fen, tariff_class, bill[_MEMO_FIELDS])
        answer = self.known.get(key)
        if answer is None:
            answer = self.known[key] = _settles_bill(r, bill, tariff_class, self.fee_day, self.rates)
        return answer


def _settles_bill(r: DebitIn, bill: Any, tariff_class: str, fee_day: dt.date, rates: LateFeeRates) -> bool:
    """The bulk path's condition, asked of the allocation rule: on the account's
    only unpaid bill, the debit is one allocation of its whole amount to that
    bill's principal (no late fee, no prepaid remainder) and leaves the bill's
    accrual as it is. The bulk UPDATE writes exactly that."""
    ((_row, due, micro),) = bills_due((bill,), tariff_class, fee_day, rates)
    plan = allocate_payment(r.amount_fen, (due,))
    if plan.prepaid_fen or len(plan.allocations) != 1 or micro != bill.accrual_micro:
        return False
    only = plan.allocations[0]
    return only.late_fee_fen == 0 and only.principal_fen == due.principal_due_fen


# ---- inserting a batch's rows by column ----

def _array_text(values: list[Any]) -> Any:
    """Ints, or strings without a quote or a backslash, as PostgreSQL array text made by one join;
    anything else (None among them, other types) stays the list for psycopg to dump element by element.
    (yindian_common.bulk_sql.pg_array means to do the same, but its string check looks at the joined text,
    whose separators hold quotes, so every string list falls back to the per-element dump.)"""
    kinds = set(map(type, values))  # one pass in C, not a generator per element
    if kinds == {int}:
        return "{" + ",".join(map(str, values)) + "}"
    if kinds == {str}:
        raw = "".join(values)
        if '"' not in raw and "\\" not in raw:
            return '{"' + '","'.join(values) + '"}'
    return values


def list_of(conn: Connection, values: Sequence[object]) -> object:
    """bulk_sql.list_param, with lists of strings as array text on PostgreSQL too (see _array_text)."""
    if conn.dialect.name == "postgresql" and values:
        return _array_text(list(values))
    return list_param(conn, values)


def _pg_cast(table: sa.Table, name: str) -> str:
    # the casts bulk_sql's own inserts use (text for strings: a varchar(n)[] cast checks each element's length)
    return _pg_type(table.c[name])


def insert_columns(conn: Connection, table: sa.Table, shared: dict[str, Any], columns: dict[str, list[Any]],
                    returning: Sequence[str] = ()) -> list[tuple[Any, ...]] | None:
    """Inserts a batch given by column: `shared` values of every row, `columns` one list per column (all of
    one length, at least 1). On PostgreSQL one `INSERT ... SELECT ... FROM unnest(arrays)` built from the
    columns as they are (a list whose values are all equal goes once, as a shared value), answering the
    `returning` columns; elsewhere dict rows through bulk_sql.bulk_insert, answering None. The feed's
    posting built a dict per row and bulk_insert took it apart again per column: 8.5 µs per payment of
    mis_adapter's CPU (5,000 rows, measured), where this takes about 1."""
    names = list(columns)
    if conn.dialect.name != "postgresql":
        rows = [dict(shared, **dict(zip(names, values, strict=True))) for values in zip(*columns.values(), strict=True)]
        bulk_insert(conn, table, rows)
        return None
    n = len(columns[names[0]])
    exprs: list[str] = []
    consts: list[Any] = []
    arrays: list[Any] = []
    array_types: list[str] = []
    for name, value in shared.items():
        exprs.append(f"%b::{_pg_cast(table, name)}")
        consts.append(value)
    for name in names:
        values = columns[name]
        if len(values) != n:
            raise ValueError(f"column {name} has {len(values)} values, not {n}")
        first = values[0]
        if n > 1 and (first is None or type(first) in (int, str)) and values.count(first) == n:
            exprs.append(f"%b::{_pg_cast(table, name)}")
            consts.append(first)
            continue
        array = _array_text(values)
        exprs.append(f"u.a{len(arrays)}")
        arrays.append(array)
        array_types.append(f"%{'t' if isinstance(array, str) else 'b'}::{_pg_cast(table, name)}[]")
    if not arrays:  # every value shared: unnest needs one array for the row count
        array_types.append("%t::bigint[]")
        arrays.append("{" + ",".join("0" * n) + "}")
    sql = (f"INSERT INTO {table.name} ({', '.join([*shared, *names])}) SELECT {', '.join(exprs)} "
           f"FROM unnest({', '.join(array_types)}) AS u({', '.join(f'a{i}' for i in range(len(arrays)))})")
    if not returning:
        conn.exec_driver_sql(sql, (*consts, *arrays))
        return []
    return [tuple(r) for r in conn.exec_driver_sql(f"{sql} RETURNING {', '.join(returning)}", (*consts, *arrays))]


def _write_plan(conn: Connection, bank_id: str, plan: _Plan, today: dt.date, now: dt.datetime,
                prepaid: dict[str, int], report: ApplyReport) -> None:
    # Arrears after a surplus debit: what the account still owes (unchanged by it).
    surplus_accts = sorted({r.account_no for r in plan.surplus})
    arrears = {row.account_no: int(row.due or 0) for row in conn.execute(
        _UNPAID_BY_ACCOUNT, {"accts": list_of(conn, surplus_accts)})} if surplus_accts else {}
    new_debits = plan.fast + plan.surplus
    # The fast debits settle their bill exactly: nothing owed after, the prepaid balance untouched.
    arrears_after = [0] * len(plan.fast)
    prepaid_after = [prepaid.get(r.account_no, 0) for r in plan.fast]
    prepaid_added = [0] * len(plan.fast)
    surplus_after: list[int] = []
    for r in plan.surplus:
        prepaid[r.account_no] = prepaid.get(r.account_no, 0) + r.amount_fen
        surplus_after.append(prepaid[r.account_no])
        arrears_after.append(arrears.get(r.account_no, 0))
        prepaid_after.append(prepaid[r.account_no])
        prepaid_added.append(r.amount_fen)
    ids = _insert_payments(conn, bank_id, new_debits, today, now, arrears_after, prepaid_after, prepaid_added)
    if plan.fast:
        # The fast debits' bills are distinct (one unpaid bill per account, one debit per account), read above
        # with their accounts locked: the UPDATE settles each, or the batch is not posted (a bill the read saw
        # unpaid that is no longer so would otherwise be allocated twice).
        settled = conn.execute(_SETTLE_BILLS, {"ids": list_of(conn, [r.bill_id for r in plan.fast]),
                                               "today": today}).rowcount
        if settled != len(plan.fast):
            raise RuntimeError(f"feed settled {settled} of its batch's {len(plan.fast)} bills")
    if plan.dunning:
        conn.execute(_DUN_BILLS, {"ids": list_of(conn, [r.bill_id for r in plan.dunning])})

    # Each list's disposition, in the order of `everything`; columns taken by one transposition (DebitIn is a
    # named tuple), not a comprehension per column and a dict look-up per disposition.
    earlier = [e[0] for e in plan.earlier]
    everything = plan.fast + plan.surplus + earlier + plan.reversed_ + plan.dunning + plan.no_arrears \
        + plan.withdrawn
    dispositions = ["PAID"] * len(plan.fast) + ["REFUND"] * len(plan.surplus) \
        + ["REFUND" if added > 0 else "POSTED" for _r, _pid, added in plan.earlier] \
        + ["REVERSED"] * len(plan.reversed_) + ["DUNNING"] * len(plan.dunning) \
        + ["NO_ARREARS"] * len(plan.no_arrears) + [agreements.WITHDRAWN] * len(plan.withdrawn)
    if everything:
        seqs, outcomes, serials, amounts, bill_ids, accts = map(list, zip(*everything, strict=True))
        insert_columns(conn, T_RES, {"bank_id": bank_id, "received_at": now}, {
            "seq": seqs, "outcome": outcomes, "bank_serial": serials, "amount_fen": amounts,
            "bill_id": bill_ids, "account_no": accts, "disposition": dispositions})
        report.dispositions.update(zip(seqs, dispositions, strict=True))
    if plan.fast:
        n_fast = len(plan.fast)  # everything starts with the fast debits
        insert_columns(conn, T_ALLOC, {"late_fee_fen": 0}, {
            "payment_id": [ids[s] for s in serials[:n_fast]], "bill_id": bill_ids[:n_fast],
            "principal_fen": amounts[:n_fast]})
    # One journal line per new debit (POSTED, with its payment), then per debit refused for lack of funds.
    unpaid = plan.dunning + plan.no_arrears
    journalled = new_debits + unpaid
    if journalled:
        _seqs, _outcomes, j_serials, j_amounts, _bills, j_accts = map(list, zip(*journalled, strict=True))
        n_new = len(new_debits)
        insert_columns(conn, T_JOURNAL, {"at": now, "bank_id": bank_id, "rpc": "DEBIT", "original_serial": ""}, {
            "serial": j_serials[:n_new] + [""] * len(unpaid),
            "account_no": j_accts, "amount_fen": j_amounts,
            "outcome": ["POSTED"] * n_new + [INSUFFICIENT_FUNDS] * len(unpaid),
            "payment_id": [ids[s] for s in j_serials[:n_new]] + [None] * len(unpaid)})
    _write_surplus(conn, bank_id, plan, now, surplus_after, ids, report)
    report.paid += len(plan.fast)
    report.posted += len(plan.earlier)
    report.dunning += len(plan.dunning)


def _insert_payments(conn: Connection, bank_id: str, debits: list[DebitIn], today: dt.date, now: dt.datetime,
                     arrears_after: list[int], prepaid_after: list[int], prepaid_added: list[int]) -> dict[str, int]:
    """Inserts the new debits' AUTO_DEBIT payments; returns their ids by serial: on PostgreSQL from the
    INSERT itself (RETURNING), elsewhere read back once by the unique (bank, serial) index."""
    if not debits:
        return {}
    serials = [r.bank_serial for r in debits]
    accts = [r.account_no for r in debits]
    returned = insert_columns(conn, T_PAY, {
        "bank_id": bank_id, "state": "POSTED", "channel": AUTO_DEBIT, "outlet_code": "", "teller_id": "",
        "bank_balance_fen": None, "settlement_date": today, "posted_at": now,
    }, {"bank_serial": serials, "account_no": accts, "branch_code": [a[:2] for a in accts],
        "amount_fen": [r.amount_fen for r in debits], "arrears_after_fen": arrears_after,
        "prepaid_after_fen": prepaid_after, "prepaid_added_fen": prepaid_added},
        returning=("bank_serial", "payment_id"))
    if returned is not None:
        return {serial: int(pid) for serial, pid in returned}
    return {row.bank_serial: row.payment_id for row in conn.execute(
        _PAYMENTS_BY_SERIAL, {"bank_id": bank_id, "serials": list_of(conn, serials)})}


def _write_surplus(conn: Connection, bank_id: str, plan: _Plan, now: dt.datetime, surplus_after: list[int],
                   ids: dict[str, int], report: ApplyReport) -> None:
    refunds: list[tuple[DebitIn, int, int]] = [(r, 0, r.amount_fen) for r in plan.surplus]
    refunds += [(r, pid, added) for r, pid, added in plan.earlier if added > 0]
    if not refunds:
        return
    if plan.surplus:
        for r in plan.surplus:
            conn.execute(_ADD_PREPAID, {"acct": r.account_no, "delta": r.amount_fen})
        conn.execute(T_PREPAID.insert(), [
            {"account_no": r.account_no, "reason": "DEBIT_SURPLUS", "delta_fen": r.amount_fen,
             "balance_after_fen": after, "payment_id": ids[r.bank_serial], "bill_id": r.bill_id, "at": now}
            for r, after in zip(plan.surplus, surplus_after, strict=True)])
        refunds = [(r, ids[r.bank_serial] if pid == 0 else pid, added) for r, pid, added in refunds]
    conn.execute(T_REF.insert(), [
        {"bank_id": bank_id, "seq": r.seq, "bill_id": r.bill_id, "account_no": r.account_no,
         "bank_serial": r.bank_serial, "amount_fen": added, "payment_id": pid, "listed_at": now}
        for r, pid, added in refunds])
    report.refunds += len(refunds)
    # A bank configured for refunds gets them back (offered in this transaction), else they stay credit.
    refunds_.offer_in_tx(conn, bank_id, [r.seq for r, _pid, _added in refunds], now)


def _advance_cursor(conn: Connection, bank_id: str, seq: int, now: dt.datetime) -> None:
    params = {"p_bank": bank_id, "p_seq": seq, "p_now": now}
    if conn.execute(_UPSERT_CURSOR_UPDATE, params).rowcount == 0:
        _insert_ignore(conn, T_CUR, {"bank_id": bank_id, "acked_through_seq": 0, "updated_at": now})
        conn.execute(_UPSERT_CURSOR_UPDATE, params)


@dataclass(frozen=True)
class _Account:
    """What Pay's writes need of a locked account (payments.pay_in_tx)."""
    branch_code: str
    tariff_class: str
    prepaid_fen: int


def _post_general(conn: Connection, books: payments.Books, bank_id: str, plan: _Plan, accounts: dict[str, Any],
                  prepaid: dict[str, int], fee_day: dt.date, today: dt.date, now: dt.datetime) -> None:
    """Posts the debits the bulk path does not settle with Pay's own writes
    (payments.pay_in_tx: oldest first, late fee before principal, rest to
    prepaid), in this transaction, in result order; they then count as
    earlier payments of their serial (POSTED, or REFUND with their surplus)."""
    for r in plan.general:
        acct = accounts.get(r.account_no)
        if acct is None:
            raise AccountNotFound(f"account {r.account_no} not found")
        if acct.status != "OPEN":
            raise AccountClosed(f"account {r.account_no} is closed")
        cmd = payments.PayCommand(bank_id=bank_id, bank_serial=r.bank_serial, account_no=r.account_no,
                                  amount_fen=r.amount_fen, channel=AUTO_DEBIT)
        posted = payments.pay_in_tx(conn, books.rates, cmd,
                                    _Account(acct.branch_code, acct.tariff_class, prepaid[r.account_no]),
                                    fee_day=fee_day, settlement=today, now=now)
        prepaid[r.account_no] = posted.prepaid_after_fen
        plan.earlier.append((r, posted.payment_pk, posted.plan.prepaid_fen))
    plan.earlier.sort(key=lambda e: e[0].seq)


# apply_results' attempts: without reading the serials, with the read, and once more with it when a serial was
# committed by another channel meanwhile (the unique key; the last attempt's IntegrityError is raised).
APPLY_ATTEMPTS = 3


def apply_results(books: payments.Books, bank_id: str, results: Sequence[DebitIn], cursor_to: int) -> ApplyReport:
    """Stores `results` (new ones only: the caller filtered duplicates) with
    their money effects and advances the cursor to `cursor_to`, all in one
    transaction. Debits the bulk path cannot settle are posted in it by Pay's
    own writes (`payments.pay_in_tx`). A serial committed meanwhile by
    another channel (unique key) makes the batch start over once: it is then
    an earlier payment of that serial.

    The first attempt does not read the batch's serials among the payments: almost every debit's serial is
    new, and that read (an ANY over 5,000 serials) was planned as a scan of the bank's payments, growing
    with every batch posted (1.35M index entries read for 100k bills). Every debit's serial is written as a
    payment in this transaction (bulk, surplus or Pay's own writes), so one that is not new meets the
    unique (bank, serial) key, the transaction rolls back with nothing written, and the batch is posted
    again with the read, exactly as before. So the read is made only when a serial is known."""
    engine = books.router.primary
    for attempt in range(APPLY_ATTEMPTS):
        report = ApplyReport()
        now = _utc(books.clock.now())
        fee_day = business_date(books.clock)
        try:
            with engine.begin() as conn:
                # Bank-day lock before any account lock; a reconciled today settles tomorrow (as Pay does).
                lock_bank_day(conn, bank_id)
                today = settlement_day(conn, bank_id, fee_day)
                accts = sorted({r.account_no for r in results})
                prepaid: dict[str, int] = {}
                accounts: dict[str, Any] = {}
                if accts:
                    for row in conn.execute(_LOCK_CUSTOMERS, {"accts": list_of(conn, accts)}).all():
                        prepaid[row.account_no] = int(row.prepaid_fen)
                        accounts[row.account_no] = row
                plan = _classify(conn, bank_id, results, fee_day, books.rates, accounts,
                                 read_serials=attempt > 0) if results else _Plan()
                general = list(plan.general)
                if general:
                    _post_general(conn, books, bank_id, plan, accounts, prepaid, fee_day, today, now)
                if results:
                    _write_plan(conn, bank_id, plan, today, now, prepaid, report)
                if results:
                    crash_point("mis.feed_after_post")
                if cursor_to > 0:
                    _advance_cursor(conn, bank_id, cursor_to, now)
        except IntegrityError:
            if attempt == APPLY_ATTEMPTS - 1:
                raise
            continue
        for r in general:
            business_metrics.record_payment(bank_id, AUTO_DEBIT, r.amount_fen)
        return report
    raise AssertionError("unreachable")
