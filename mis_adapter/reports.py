"""Back-office statistics (后台处理): collections for a period and arrears as
of a date, reconstructed from history so that a report for a past period or
date gives that period's figures whenever it is run.

Collections for [from, to]: the payments of those settlement dates. A payment
counts as collected unless it was reversed on or before `to`; reversed ones
count as cancellations (count and fen). Tombstones are not payments.

Arrears as of the end of day D: bills issued on or before D whose principal
was not fully paid by then. "Paid by then" is the bill's current state with
the effect of later history undone:

    paid(D) = paid now - allocations of payments posted after D (still posted)
                       + allocations of payments posted on or before D and
                         reversed after D

Late fees as of D come from late_fee.py (the lead's rule, not re-derived):
from the bill's current accrual when nothing after D touched it, else by
replaying the allocations in effect at D from the bill's issue, the same
steps a Pay takes.

Storage: SQLAlchemy Core, statements built once; bills are streamed in
chunks (memory flat in the number of bills); one chunk's replays are fetched
with one query. Every branch database is read and the figures added up.
Must never write (MariaDB's temporary tables, _materialised, are the
report session's own and dropped after it)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import functools
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mis_adapter.db.arrears import READY, SNAPSHOT_FORMAT, ArrearsSnapshot, ArrearsSnapshotBill
from mis_adapter.db.base import table_of
from mis_adapter.db.core import AllocationRow, BillRow, Customer, Payment
from mis_adapter.db.recon import ReconciledDay
from mis_adapter.late_fee import FeeState, LateFeeRates, accrual_as_of, late_fee_due
from mis_adapter.late_fee_sql import accrual_micro_sql, accrued_micro_sql, fee_due_from_micro_sql
from yindian_common.errors import InvalidField
from yindian_common.fields import mask_name, mask_phone

# ---- bounds ----
REPORT_PERIOD_DAYS_MAX = 3_660       # a collections period is at most ten years
REPORT_ROWS_MAX = 100_000            # groups in one collections report
ARREARS_CHUNK_ROWS = 5_000           # bills read and priced per chunk
DETAIL_PAGE_ACCOUNTS = 500           # accounts per ArrearsDetail page
REPORT_WORK_MEM = "64MB"             # PostgreSQL work_mem of a report's transaction
REPORT_TMP_TABLE_BYTES = 64 << 20    # MariaDB: in-memory temporary tables of a report's session
REPORT_PARTS_MARIADB = 2             # MariaDB: connections an arrears report adds up on at once (_parts)
DETAIL_PAGE_PAYMENTS = 500           # payments per CollectionDetail page
# An arrears report for a date D reads the newest valid snapshot of a day S <= D (arrears_snapshot.py) instead
# of every bill; off: every report reconstructs from every bill, as before the snapshots.
ARREARS_SNAPSHOTS = True
# PostgreSQL: the snapshot is read only while at most this many payments were settled or reversed between its day
# and the report's (their bills are replayed: _touched_since_snapshot).
# Its one pass over every bill (_arrears_bills) then costs less than reading the snapshot and joining the touched
# bills back to bills (measured on 1M bills with 100k payments after the day: past-date reports 5.6-8.9 s against
# 3.9-6.1 s at load 8-12; with none after it, today's 1.1-1.4 s against 2.2-2.8 s).
ARREARS_SNAPSHOT_PG_CHANGED_MAX = 10_000

GROUP_BYS = ("bank", "outlet", "branch", "day", "channel")
POSTED, REVERSED = "POSTED", "REVERSED"


# ---- domain ----
@dataclass
class CollectionRow:
    key: str
    count: int = 0
    amount_fen: int = 0
    cancelled_count: int = 0
    cancelled_fen: int = 0

    def add(self, other: CollectionRow) -> None:
        self.count += other.count
        self.amount_fen += other.amount_fen
        self.cancelled_count += other.cancelled_count
        self.cancelled_fen += other.cancelled_fen


@dataclass(frozen=True)
class CollectionReport:
    from_date: dt.date
    to_date: dt.date
    group_by: str
    rows: tuple[CollectionRow, ...]
    total: CollectionRow


@dataclass(frozen=True)
class CollectedPayment:
    """One payment of a collections period, with what the bank reported with it."""
    bank_id: str
    bank_serial: str
    account_no: str
    branch_code: str
    amount_fen: int
    channel: str
    outlet_code: str
    teller_id: str
    bank_balance_fen: int | None
    posted_at: dt.datetime
    settlement_date: dt.date
    state: str
    reversed_on: dt.date | None
    payment_id: int


@dataclass
class ArrearsRow:
    branch_code: str
    households: int = 0
    principal_fen: int = 0
    late_fee_fen: int = 0


@dataclass(frozen=True)
class ArrearsReport:
    as_of: dt.date
    rows: tuple[ArrearsRow, ...]
    total: ArrearsRow


@dataclass
class ArrearsAccount:
    account_no: str
    customer_name: str  # masked
    contact_phone: str  # masked
    branch_code: str
    unpaid_bills: int = 0
    principal_fen: int = 0
    late_fee_fen: int = 0
    oldest_period: str = ""


@dataclass(frozen=True)
class BillAsOf:
    """What a bill owed at the end of the as-of date."""
    account_no: str
    branch_code: str
    period: str
    principal_fen: int
    late_fee_fen: int


@dataclass
class _Replay:
    allocations: list[tuple[int, int, str, dt.date, dt.date | None]] = field(default_factory=list)


def check_period(from_date: dt.date, to_date: dt.date) -> None:
    if to_date < from_date:
        raise InvalidField("to_date", "is before from_date")
    if (to_date - from_date).days >= REPORT_PERIOD_DAYS_MAX:
        raise InvalidField("to_date", f"a period is at most {REPORT_PERIOD_DAYS_MAX} days")


def end_of_day_utc(day: dt.date, tz: ZoneInfo) -> dt.datetime:
    """The first instant after `day` in the utility's time zone, in UTC."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tz).astimezone(dt.UTC)


def fee_as_of(bill: Any, as_of: dt.date, principal_unpaid_fen: int, fee_paid_fen: int,
              replay: _Replay | None, rates: LateFeeRates) -> int:
    """The bill's late fee still owed at the end of `as_of`."""
    year = int(bill.period[:4])
    if replay is None:
        state = FeeState(principal_unpaid_fen, bill.accrual_micro, bill.accrual_date, fee_paid_fen,
                         bill.tariff_class, year)
        return late_fee_due(state, as_of, rates)
    # Replay from issue: what was paid outside any allocation (migrated history) counts from the start.
    posted_principal = sum(p for p, _f, st, _sd, _ro in replay.allocations if st == POSTED)
    posted_fee = sum(f for _p, f, st, _sd, _ro in replay.allocations if st == POSTED)
    unpaid = bill.amount_fen - bill.prepaid_applied_fen - (bill.principal_paid_fen - posted_principal)
    fee_paid = bill.late_fee_paid_fen - posted_fee
    micro, accrual_date = 0, bill.due_date
    for principal, fee, st, sd, reversed_on in replay.allocations:
        if sd > as_of or (st == REVERSED and reversed_on is not None and reversed_on <= as_of):
            continue
        micro = accrual_as_of(FeeState(unpaid, micro, accrual_date, fee_paid, bill.tariff_class, year), sd, rates)
        accrual_date = max(sd, accrual_date)
        unpaid -= principal
        fee_paid += fee
    return late_fee_due(FeeState(unpaid, micro, accrual_date, fee_paid, bill.tariff_class, year), as_of, rates)


# ---- statements, built once ----
T_PAY = table_of(Payment)
T_BILL = table_of(BillRow)
T_CUST = table_of(Customer)
T_ALLOC = table_of(AllocationRow)
T_SNAP = table_of(ArrearsSnapshot)
T_SNAP_BILL = table_of(ArrearsSnapshotBill)
T_RECON = table_of(ReconciledDay)
_b = sa.bindparam
_FROM = _b("from_day", type_=sa.Date)
_TO = _b("to_day", type_=sa.Date)
_AS_OF = _b("as_of", type_=sa.Date)
_SNAP_DAY = _b("snap_day", type_=sa.Date)          # the day of the snapshot a report reads
_BILLS_UPTO = _b("bills_upto", type_=sa.BigInteger)  # the snapshot's bills_upto

_kept = sa.or_(T_PAY.c.state == POSTED, T_PAY.c.reversed_on > _TO)
_cancelled = sa.and_(T_PAY.c.state == REVERSED, T_PAY.c.reversed_on <= _TO)
_GROUP_COLUMNS = {"bank": (T_PAY.c.bank_id,), "outlet": (T_PAY.c.bank_id, T_PAY.c.outlet_code),
                  "branch": (T_PAY.c.branch_code,), "day": (T_PAY.c.settlement_date,),
                  "channel": (T_PAY.c.channel,)}
_PERIOD = sa.and_(T_PAY.c.settlement_date >= _FROM, T_PAY.c.settlement_date <= _TO,
                  T_PAY.c.state.in_([POSTED, REVERSED]))
_OF_BANK = T_PAY.c.bank_id == _b("bank_id")


def _collections_query(cols: tuple[Any, ...], of_bank: bool) -> sa.Select[Any]:
    q = (sa.select(*cols,
                   sa.func.sum(sa.case((_kept, 1), else_=0)).label("n"),
                   sa.func.sum(sa.case((_kept, T_PAY.c.amount_fen), else_=0)).label("fen"),
                   sa.func.sum(sa.case((_cancelled, 1), else_=0)).label("cn"),
                   sa.func.sum(sa.case((_cancelled, T_PAY.c.amount_fen), else_=0)).label("cfen"))
         .where(_PERIOD))
    if of_bank:
        q = q.where(_OF_BANK)
    return q.group_by(*cols).order_by(*cols).limit(REPORT_ROWS_MAX + 1)


# (group by, one bank only) -> statement
_COLLECTIONS = {(g, of_bank): _collections_query(cols, of_bank)
                for g, cols in _GROUP_COLUMNS.items() for of_bank in (False, True)}
_PAYMENTS_OF_PERIOD = (sa.select(T_PAY.c.payment_id, T_PAY.c.bank_id, T_PAY.c.bank_serial, T_PAY.c.account_no,
                                 T_PAY.c.branch_code, T_PAY.c.amount_fen, T_PAY.c.channel, T_PAY.c.outlet_code,
                                 T_PAY.c.teller_id, T_PAY.c.bank_balance_fen, T_PAY.c.posted_at,
                                 T_PAY.c.settlement_date, T_PAY.c.state, T_PAY.c.reversed_on)
                       .where(_PERIOD,
                              sa.or_(_b("bank_id") == "", _OF_BANK),
                              sa.or_(_b("outlet_code") == "", T_PAY.c.outlet_code == _b("outlet_code")))
                       .order_by(T_PAY.c.settlement_date, T_PAY.c.bank_id, T_PAY.c.payment_id))

# Allocations whose effect differs between "now" and "the end of as_of".
_changed_since = sa.or_(sa.and_(T_PAY.c.state == POSTED, T_PAY.c.settlement_date > _AS_OF),
                        sa.and_(T_PAY.c.state == REVERSED, T_PAY.c.settlement_date <= _AS_OF,
                                T_PAY.c.reversed_on > _AS_OF))
_sign = sa.case((T_PAY.c.state == POSTED, -1), else_=1)
_DELTA_SELECT = (sa.select(T_ALLOC.c.bill_id,
                           sa.func.sum(_sign * T_ALLOC.c.principal_fen).label("principal_delta"),
                           sa.func.sum(_sign * T_ALLOC.c.late_fee_fen).label("fee_delta"))
                 .select_from(T_ALLOC.join(T_PAY, T_PAY.c.payment_id == T_ALLOC.c.payment_id))
                 .where(_changed_since).group_by(T_ALLOC.c.bill_id))
_DELTA = _DELTA_SELECT.subquery("delta")
# The same, driven by the payments posted or reversed after as_of (found by index), not by every allocation.
_CHANGED = sa.union_all(
    sa.select(T_PAY.c.payment_id, T_PAY.c.state).where(T_PAY.c.settlement_date > _AS_OF, T_PAY.c.state == POSTED),
    sa.select(T_PAY.c.payment_id, T_PAY.c.state).where(T_PAY.c.reversed_on > _AS_OF, T_PAY.c.state == REVERSED,
                                                       T_PAY.c.settlement_date <= _AS_OF)).subquery("changed")
# Grouped by `bill_id + 0`, which no index gives: SQLite would otherwise walk every allocation in bill order.
# Cast back to an integer: a bare expression has no affinity on SQLite, which then cannot build an automatic
# index to join the bills to it (each bill would scan every touched bill).
_ALLOC_BILL_EXPR = sa.cast(T_ALLOC.c.bill_id + sa.literal_column("0"), sa.BigInteger)
_ALLOC_BILL = _ALLOC_BILL_EXPR.label("bill_id")
_DELTA_BY_PAYMENTS = (sa.select(_ALLOC_BILL,  # sums cast back to bigint: PostgreSQL's sum(bigint) is numeric
                                sa.cast(sa.func.sum(sa.case((_CHANGED.c.state == POSTED, -1), else_=1)
                                                    * T_ALLOC.c.principal_fen), sa.BigInteger).label("principal_delta"),
                                sa.cast(sa.func.sum(sa.case((_CHANGED.c.state == POSTED, -1), else_=1)
                                                    * T_ALLOC.c.late_fee_fen), sa.BigInteger).label("fee_delta"))
                      .select_from(_CHANGED.join(T_ALLOC, T_ALLOC.c.payment_id == _CHANGED.c.payment_id))
                      .group_by(_ALLOC_BILL_EXPR))


def _sum_bigint(x: Any) -> Any:
    """SUM as bigint: PostgreSQL's sum(bigint) is numeric (a Decimal per value in Python)."""
    return sa.cast(sa.func.sum(x), sa.BigInteger)


def _arrears_query(branch: bool, *, indexed: bool = True, union: bool = True) -> sa.Select[Any]:
    """Every bill in arrears at the end of as_of, by account and period.

    indexed: return only the bills that can be in arrears at as_of (the bills
    unpaid now, those paid after as_of, those touched by payments posted or
    reversed after as_of; paid_on is not indexed since 0004_bills_indexes, so
    the first two are one filtered scan). Otherwise the whole bills table is read (the reconstruction
    the indexed path is property-tested against). Fees are priced in Python
    (bills_in_arrears); the summed reports price them in SQL (_arrears_bills).

    A bill's paid_on is set exactly when it is PAID (payments.py, feed.py,
    issue_bills.py), so "not paid by as_of" is paid_on NULL or after as_of."""
    if not indexed:
        return _arrears_scan_query(branch)
    delta = _DELTA_BY_PAYMENTS.cte("delta")
    # SQLite, MariaDB: the customer joined on an expression, so that no index of bills by account invites
    # a walk over every bill (from every customer)
    cust_join = T_CUST.c.account_no == (sa.func.coalesce(T_BILL.c.account_no, "") if union else T_BILL.c.account_no)
    # Three disjoint parts, each read once by its own index or scan (no second pass over bills to join
    # candidates back): unpaid now, paid after as_of, paid by as_of but touched by payments after it.
    now_read = T_BILL.outerjoin(delta, delta.c.bill_id == T_BILL.c.bill_id).join(T_CUST, cust_join)
    touched = delta.join(T_BILL, T_BILL.c.bill_id == delta.c.bill_id).join(T_CUST, cust_join)
    parts = (_arrears_part(now_read, delta, branch).where(T_BILL.c.paid_on.is_(None)),
             _arrears_part(now_read, delta, branch).where(T_BILL.c.paid_on > _AS_OF),
             _arrears_part(touched, delta, branch).where(T_BILL.c.paid_on <= _AS_OF))
    u = sa.union_all(*parts).subquery("arrears_parts")
    return sa.select(u).order_by(u.c.account_no, u.c.period, u.c.bill_id)


def _arrears_part(frm: Any, delta: Any, branch: bool) -> sa.Select[Any]:
    """The columns of _arrears_query over `frm` (bills, their customer, their delta)."""
    principal_delta = sa.func.coalesce(delta.c.principal_delta, 0)
    unpaid = T_BILL.c.amount_fen - T_BILL.c.prepaid_applied_fen - T_BILL.c.principal_paid_fen - principal_delta
    needs_replay = sa.or_(delta.c.bill_id.is_not(None),
                          sa.and_(T_BILL.c.accrual_date > _AS_OF, T_BILL.c.accrual_date > T_BILL.c.due_date))
    q = (sa.select(T_BILL.c.bill_id, T_BILL.c.account_no, T_CUST.c.branch_code, T_CUST.c.tariff_class,
                   T_CUST.c.name, T_CUST.c.phone, T_BILL.c.period, T_BILL.c.amount_fen, T_BILL.c.prepaid_applied_fen,
                   T_BILL.c.principal_paid_fen, T_BILL.c.late_fee_paid_fen, T_BILL.c.accrual_micro,
                   T_BILL.c.accrual_date, T_BILL.c.due_date, unpaid.label("unpaid_fen"),
                   (T_BILL.c.late_fee_paid_fen + sa.func.coalesce(delta.c.fee_delta, 0)).label("fee_paid_fen"),
                   sa.case((needs_replay, 1), else_=0).label("needs_replay"))
         .select_from(frm)
         .where(T_BILL.c.issued_at < _b("issued_before"), unpaid > 0))
    return q.where(T_CUST.c.branch_code == _b("branch_code")) if branch else q


def _arrears_scan_query(branch: bool) -> sa.Select[Any]:
    principal_delta = sa.func.coalesce(_DELTA.c.principal_delta, 0)
    unpaid = T_BILL.c.amount_fen - T_BILL.c.prepaid_applied_fen - T_BILL.c.principal_paid_fen - principal_delta
    # The current accrual is the accrual at as_of unless history after as_of moved it.
    needs_replay = sa.or_(_DELTA.c.bill_id.is_not(None),
                          sa.and_(T_BILL.c.accrual_date > _AS_OF, T_BILL.c.accrual_date > T_BILL.c.due_date))
    q = (sa.select(T_BILL.c.bill_id, T_BILL.c.account_no, T_CUST.c.branch_code, T_CUST.c.tariff_class,
                   T_CUST.c.name, T_CUST.c.phone, T_BILL.c.period, T_BILL.c.amount_fen, T_BILL.c.prepaid_applied_fen,
                   T_BILL.c.principal_paid_fen, T_BILL.c.late_fee_paid_fen, T_BILL.c.accrual_micro,
                   T_BILL.c.accrual_date, T_BILL.c.due_date, unpaid.label("unpaid_fen"),
                   (T_BILL.c.late_fee_paid_fen + sa.func.coalesce(_DELTA.c.fee_delta, 0)).label("fee_paid_fen"),
                   sa.case((needs_replay, 1), else_=0).label("needs_replay"))
         .select_from(T_BILL.join(T_CUST, T_CUST.c.account_no == T_BILL.c.account_no)
                      .outerjoin(_DELTA, _DELTA.c.bill_id == T_BILL.c.bill_id))
         .where(T_BILL.c.issued_at < _b("issued_before"),
                sa.or_(T_BILL.c.status != "PAID", T_BILL.c.paid_on.is_(None), T_BILL.c.paid_on > _AS_OF,
                       _DELTA.c.bill_id.is_not(None)),
                unpaid > 0)
         .order_by(T_BILL.c.account_no, T_BILL.c.period, T_BILL.c.bill_id))
    return q.where(T_CUST.c.branch_code == _b("branch_code")) if branch else q


# ---- arrears priced in SQL: the untouched bills in one pass, the touched ones found from the later payments ----

# The bills whose state at as_of may differ from their state now: those with an allocation of a payment settled
# after as_of (posted, or reversed since: its accrual moved the bill's accrual date) or reversed after as_of.
# Found from the payments by their indexes (settlement_date; the partial reversed_on), never by a scan of bills.
# Complete because a bill's accrual date only ever moves to the fee day of a payment allocated to it, which is at
# most that payment's settlement date (pay_plan, feed, recon_bulk, recon_bank_only; a reversal leaves it): a bill
# whose accrual date is after as_of has an allocation settled after as_of.
def _touched_select(part: tuple[bool, bool] = (False, False), day: Any = _AS_OF) -> Any:
    """The bills touched after `day` (the as-of date; the snapshot's day for the snapshot path)."""
    a, p = T_ALLOC.alias("ta"), T_PAY.alias("tp")
    by_payment = a.join(p, p.c.payment_id == a.c.payment_id)
    # a part of the accounts (_in_part): an allocation's bill is of its payment's account (a payment pays one
    # account: payments, pay_pg, feed, recon_bulk, recon_bank_only)
    return sa.union(sa.select(a.c.bill_id).select_from(by_payment)
                    .where(p.c.settlement_date > day, *_in_part(p.c.account_no, part)),
                    sa.select(a.c.bill_id).select_from(by_payment)
                    .where(p.c.reversed_on > day, *_in_part(p.c.account_no, part)))


def _touched_since_snapshot(part: tuple[bool, bool] = (False, False)) -> Any:
    """The bills a report as of D reading the snapshot of day S <= D (snap_day, bills_upto) prices from bills
    and their history instead of from the snapshot (_arrears_bills with snap):
    - those with an allocation whose effect changed in (S, D]: of a payment settled in (S, D] or reversed in
      (S, D] (their state at D is not their state at S; found from the payments by their indexes, a range of
      days, never from every allocation);
    - those above bills_upto (not in the snapshot) with an allocation of a payment settled or reversed after
      S (their row now may not be their row at D; found from the bills by their key, few);
    - the snapshot's bills not replay_ok with an allocation of a payment settled or reversed after S (the
      reconstruction as of D replays a bill touched after D from its issue; these may have stored an
      accrual of their own: each probed by its key).
    Any other bill touched only after D keeps its snapshot row: its state at D is its state at S, and the
    replay from issue gives it too (arrears_snapshot._insert_rows)."""
    a, p = T_ALLOC.alias("ta"), T_PAY.alias("tp")
    by_payment = a.join(p, p.c.payment_id == a.c.payment_id)
    mine = _in_part(p.c.account_no, part)
    s, la, lp = T_SNAP_BILL.alias("ts"), T_ALLOC.alias("la"), T_PAY.alias("lp")
    later = (sa.select(la.c.bill_id).select_from(la.join(lp, lp.c.payment_id == la.c.payment_id))
             .where(la.c.bill_id == s.c.bill_id, sa.or_(lp.c.settlement_date > _SNAP_DAY, lp.c.reversed_on > _SNAP_DAY)))
    return sa.union(
        sa.select(s.c.bill_id).where(s.c.as_of == _SNAP_DAY, s.c.replay_ok == sa.false(), sa.exists(later),
                                     *_in_part(s.c.account_no, part)),
        sa.select(a.c.bill_id).select_from(by_payment)
        .where(p.c.settlement_date > _SNAP_DAY, p.c.settlement_date <= _AS_OF, *mine),
        sa.select(a.c.bill_id).select_from(by_payment)
        .where(p.c.reversed_on > _SNAP_DAY, p.c.reversed_on <= _AS_OF, *mine),
        sa.select(a.c.bill_id).select_from(by_payment)
        .where(a.c.bill_id > _BILLS_UPTO, sa.or_(p.c.settlement_date > _SNAP_DAY, p.c.reversed_on > _SNAP_DAY),
               *mine))


def _in_part(account_no: Any, part: tuple[bool, bool]) -> tuple[Any, ...]:
    """The accounts of a part of a MariaDB report (_parts): (bounded below, bounded above) by the
    parameters part_from (inclusive) and part_to (exclusive); (False, False) is every account."""
    low, high = part
    return ((account_no >= _b("part_from"),) if low else ()) + ((account_no < _b("part_to"),) if high else ())


# MariaDB evaluates a CTE once per reference: there the touched bills, their histories and their replayed
# segments are materialised once per report, as temporary tables of the report's session keyed by bill
# (private to it, dropped after it; nothing shared is written). Each is named once per statement.
_TMP_TOUCHED, _TMP_HISTORY, _TMP_SEGMENTS = "yd_report_touched", "yd_report_history", "yd_report_segments"
_HISTORY_COLUMNS = ("bill_id", "posted_principal", "posted_fee", "eff_principal", "eff_fee", "last_day",
                    "principal_delta", "in_delta")
_TMP_TOUCHED_TABLE = sa.table(_TMP_TOUCHED, sa.column("bill_id"))
_TMP_HISTORY_TABLE = sa.table(_TMP_HISTORY, *(sa.column(c) for c in _HISTORY_COLUMNS))
_TMP_SEGMENTS_TABLE = sa.table(_TMP_SEGMENTS, sa.column("bill_id"), sa.column("micro"))


def _in_effect(p: Any) -> Any:
    """The allocations of payment `p` in effect at the end of as_of: settled by then, not reversed by then."""
    return sa.and_(p.c.settlement_date <= _AS_OF,
                   sa.not_(sa.and_(p.c.state == REVERSED, p.c.reversed_on.is_not(None), p.c.reversed_on <= _AS_OF)))


def _history_select(touched: Any) -> Any:
    """One row per touched bill (_touched_select): sums over every allocation of the bill, in no order (one
    hash aggregate over narrow rows, no sort): the principal and fee of its posted allocations (what the
    replay undoes to find the bill at its issue), of its allocations in effect at as_of (`eff_principal`,
    `eff_fee`), the last in-effect settlement day, and the principal changed since as_of (`principal_delta`:
    posted after it undone, reversed after it restored; `in_delta` 1 when any allocation changed)."""
    a, p = T_ALLOC.alias("ha"), T_PAY.alias("hp")
    posted = p.c.state == POSTED
    in_effect = _in_effect(p)
    changed = sa.case((sa.and_(posted, p.c.settlement_date > _AS_OF), -1),
                      (sa.and_(p.c.state == REVERSED, p.c.settlement_date <= _AS_OF, p.c.reversed_on > _AS_OF), 1),
                      else_=0)
    effect = sa.case((in_effect, 1), else_=0)
    return (sa.select(a.c.bill_id,
                      _sum_bigint(sa.case((posted, a.c.principal_fen), else_=0)).label("posted_principal"),
                      _sum_bigint(sa.case((posted, a.c.late_fee_fen), else_=0)).label("posted_fee"),
                      _sum_bigint(effect * a.c.principal_fen).label("eff_principal"),
                      _sum_bigint(effect * a.c.late_fee_fen).label("eff_fee"),
                      sa.func.max(sa.case((in_effect, p.c.settlement_date))).label("last_day"),
                      _sum_bigint(changed * a.c.principal_fen).label("principal_delta"),
                      sa.func.max(sa.case((changed != 0, 1), else_=0)).label("in_delta"))
            .select_from(touched.join(a, a.c.bill_id == touched.c.bill_id).join(p, p.c.payment_id == a.c.payment_id))
            .group_by(a.c.bill_id))


# MariaDB sorts a GROUP BY's output by its keys unless told ORDER BY NULL: the groups that are only added up
# again, or stored in a table keyed by bill, are not sorted there
_UNORDERED = (sa.null(),)


def _segments_select(touched: Any, rates: LateFeeRates, dialect: str) -> Any:
    """fee_as_of's loop as sums, one row per touched bill (_touched_select) with an allocation in effect at
    as_of: the fee it accrued from its issue up to its last such allocation, in millionths of a fen (`micro`).

    From the bill's issue, every allocation in effect at as_of, in settlement order, accrues the fee on the
    principal still unpaid before it (the bill at its issue, its posted allocations undone, less what the
    in-effect allocations before it paid: `paid_before`) over the days since the previous one (or the due
    date); what was paid outside any allocation (migrated history) counts from the start. Only the bills with
    an allocation in effect are ordered (the window); a touched bill with none has no row (its accrual
    restarts at its due date, _arrears_bills)."""
    a, p = T_ALLOC.alias("sa"), T_PAY.alias("sp")
    ea, ep = T_ALLOC.alias("ea"), T_PAY.alias("ep")
    replayed_bills = (sa.select(ea.c.bill_id)
                      .select_from(touched.join(ea, ea.c.bill_id == touched.c.bill_id)
                                   .join(ep, ep.c.payment_id == ea.c.payment_id))
                      .where(_in_effect(ep)))
    in_effect = _in_effect(p)
    effect = sa.case((in_effect, 1), else_=0)
    order = (p.c.settlement_date, p.c.payment_id, a.c.allocation_id)
    steps = (sa.select(a.c.bill_id, p.c.settlement_date, effect.label("in_effect"),
                       sa.func.sum(sa.case((p.c.state == POSTED, a.c.principal_fen), else_=0))
                       .over(partition_by=a.c.bill_id).label("posted_principal"),
                       sa.func.sum(effect * a.c.principal_fen)
                       .over(partition_by=a.c.bill_id, order_by=order, rows=(None, -1)).label("paid_before"),
                       sa.func.max(sa.case((in_effect, p.c.settlement_date)))
                       .over(partition_by=a.c.bill_id, order_by=order, rows=(None, -1)).label("previous_day"))
             .select_from(a.join(p, p.c.payment_id == a.c.payment_id))
             .where(a.c.bill_id.in_(replayed_bills))
             .subquery("replay_steps"))
    s, b, c = steps.c, T_BILL, T_CUST
    unpaid_at_issue = b.c.amount_fen - b.c.prepaid_applied_fen - b.c.principal_paid_fen + s.posted_principal
    since = sa.case((s.previous_day > b.c.due_date, s.previous_day), else_=b.c.due_date)
    micro = accrued_micro_sql(principal=unpaid_at_issue - sa.func.coalesce(s.paid_before, 0), from_date=since,
                              to_date=s.settlement_date, tariff_class=c.c.tariff_class, period=b.c.period,
                              rates=rates)
    return (sa.select(s.bill_id, _sum_bigint(micro).label("micro"))
            .select_from(steps.join(b, b.c.bill_id == s.bill_id).join(c, _customer_of(b, c, dialect)))
            .where(s.in_effect == 1)
            .group_by(s.bill_id))


def _customer_of(b: Any, c: Any, dialect: str) -> Any:
    """The join of bills `b` to their customer `c`. SQLite, MariaDB: on an expression, so that no index of
    bills by account invites a walk over every bill (from every customer)."""
    return c.c.account_no == (sa.func.coalesce(b.c.account_no, "") if dialect in ("sqlite", "mysql")
                              else b.c.account_no)


def _arrears_bills(branch: bool, rates: LateFeeRates, dialect: str,
                   part: tuple[bool, bool] = (False, False), snap: bool = False, fee_state: bool = False) -> Any:
    """Every bill in arrears at the end of as_of with what it owed then (columns bill_id, account_no,
    branch_code, period, unpaid_fen, fee_sql; no names or phones, which the detail joins to each account,
    not to each bill), priced as the reference reconstruction
    (bills_in_arrears with indexed=False) prices it, in two disjoint parts:

    - untouched: the bills unpaid now or paid after as_of that no allocation of a payment settled or reversed
      after as_of touched. Their state now is their state at as_of: priced from their current accrual. One
      filtered pass over the bills.
    - touched (_touched_select, found from the payments of after as_of by index): each with its history
      (_history_select) and replayed segments (_segments_select) joined one to one, and priced as the
      reference does: replayed from its issue when it is in the delta or accrued past as_of, otherwise from
      its current accrual; the delta's principal undone. O(allocations of the touched bills), and only the
      allocations in effect at as_of are sorted.

    No scan of bills finds the bills to replay (a bill accrued past as_of is touched, _touched_select).

    snap: no pass over every bill. The bills are taken from the snapshot of a day S <= as_of (parameters
    snap_day, bills_upto; arrears_snapshot.py: every bill up to bills_upto in arrears at the end of S, as it
    stood then) in three disjoint parts, `touched` being _touched_since_snapshot (the bills whose allocations
    changed in (S, as_of], and those above bills_upto changed at any time after S):
    - the snapshot's bills not touched. No allocation of theirs changed effect in (S, as_of], so their state
      at as_of is their state at S with the fee accrued on (the only writes dated on or before S that can
      come after the snapshot, a reconciliation of such a day, make the report ignore it: _snapshot_of);
    - the bills above bills_upto not touched after S: their row now is their row at as_of;
    - the touched part above over the touched bills (exact for any bill: one with no allocation settled or
      reversed after as_of has no delta and an accrual date on or before as_of or at its due date, and is
      priced from its row now, as the untouched part would price it).
    A bill in none of these is at or below bills_upto (so issued by the end of S), was not in arrears at S
    and nothing changed it in (S, as_of]: not in arrears at as_of.

    fee_state: the bills with their fee state (micro: the accrual through as_of; fee_paid) instead of the
    fee (what a snapshot stores, arrears_snapshot.py)."""
    touched: Any
    if dialect == "mysql":
        touched, history, segments = _TMP_TOUCHED_TABLE, _TMP_HISTORY_TABLE, _TMP_SEGMENTS_TABLE
    else:
        # the touched bills are named three times (a CTE, computed once); each history and segment once (a
        # subquery: PostgreSQL plans its joins from the tables' statistics, which a CTE hides)
        touched = (_touched_since_snapshot() if snap else _touched_select()).cte("touched")
        history = _history_select(touched).subquery("history")
        segments = _segments_select(touched, rates, dialect).subquery("segments")
    b, c, h, g = T_BILL, T_CUST, history.c, segments.c
    cust_join = _customer_of(b, c, dialect)
    unpaid_now = b.c.amount_fen - b.c.prepaid_applied_fen - b.c.principal_paid_fen
    current_micro = accrual_micro_sql(principal_unpaid=unpaid_now, accrual_micro=b.c.accrual_micro,
                                      accrual_date=b.c.accrual_date, tariff_class=c.c.tariff_class,
                                      period=b.c.period, as_of=_AS_OF, rates=rates)

    def current_rows(frm: Any) -> sa.Select[Any]:
        """The bills of `frm` not touched after as_of that are in arrears then, priced from their row now."""
        return (sa.select(b.c.bill_id, b.c.account_no, c.c.branch_code, b.c.period,
                          unpaid_now.label("unpaid_fen"), current_micro.label("micro"),
                          b.c.late_fee_paid_fen.label("fee_paid"))
                .select_from(frm)
                .where(sa.or_(b.c.paid_on.is_(None), b.c.paid_on > _AS_OF), b.c.issued_at < _b("issued_before"),
                       unpaid_now > 0, b.c.bill_id.not_in(sa.select(touched.c.bill_id))))

    untouched = current_rows(b.join(c, cust_join))

    replayed = sa.or_(h.in_delta == 1, sa.and_(b.c.accrual_date > _AS_OF, b.c.accrual_date > b.c.due_date))
    replay_micro = accrual_micro_sql(
        principal_unpaid=unpaid_now + h.posted_principal - h.eff_principal,
        accrual_micro=sa.func.coalesce(g.micro, 0),
        accrual_date=sa.case((h.last_day > b.c.due_date, h.last_day), else_=b.c.due_date),
        tariff_class=c.c.tariff_class, period=b.c.period, as_of=_AS_OF, rates=rates)
    unpaid = unpaid_now - h.principal_delta
    touched_part = (sa.select(b.c.bill_id, b.c.account_no, c.c.branch_code, b.c.period,
                              unpaid.label("unpaid_fen"),
                              sa.case((replayed, replay_micro), else_=current_micro).label("micro"),
                              sa.case((replayed, b.c.late_fee_paid_fen - h.posted_fee + h.eff_fee),
                                      else_=b.c.late_fee_paid_fen).label("fee_paid"))
                    .select_from(history.join(b, b.c.bill_id == h.bill_id).join(c, cust_join)
                                 .outerjoin(segments, g.bill_id == h.bill_id))
                    .where(b.c.issued_at < _b("issued_before"), unpaid > 0))
    parts: list[sa.Select[Any]]
    if snap:
        s, sc = T_SNAP_BILL, T_CUST.alias("snap_customer")
        snap_micro = accrual_micro_sql(principal_unpaid=s.c.unpaid_fen, accrual_micro=s.c.accrual_micro,
                                       accrual_date=s.c.accrual_date, tariff_class=sc.c.tariff_class,
                                       period=s.c.period, as_of=_AS_OF, rates=rates)
        from_snapshot = (sa.select(s.c.bill_id, s.c.account_no, sc.c.branch_code, s.c.period,
                                   s.c.unpaid_fen.label("unpaid_fen"), snap_micro.label("micro"),
                                   s.c.late_fee_paid_fen.label("fee_paid"))
                         .select_from(s.join(sc, sc.c.account_no == s.c.account_no))
                         .where(s.c.as_of == _SNAP_DAY, s.c.bill_id.not_in(sa.select(touched.c.bill_id)),
                                *_in_part(s.c.account_no, part),
                                *((sc.c.branch_code == _b("branch_code"),) if branch else ())))
        issued_later = untouched.where(b.c.bill_id > _BILLS_UPTO)
        parts = [issued_later, touched_part]
        parts = [from_snapshot] + [q.where(*_in_part(b.c.account_no, part),
                                           *((c.c.branch_code == _b("branch_code"),) if branch else ()))
                                   for q in parts]
    elif dialect == "postgresql":
        # One pass over the bills: those that can be in arrears kept by the scan's own filter (unpaid now,
        # paid after as_of, or touched: a hashed lookup in the touched bills), then each joined to its
        # history, if any (a hash of the touched bills' histories). PostgreSQL would otherwise join the
        # touched bills back to bills by hashing every bill, a second pass. A bill is priced as untouched
        # exactly when it has no history (every touched bill has one: _history_select).
        fresh = h.bill_id.is_(None)
        unpaid_either = unpaid_now - sa.func.coalesce(h.principal_delta, 0)
        one_pass = (sa.select(b.c.bill_id, b.c.account_no, c.c.branch_code, b.c.period,
                              unpaid_either.label("unpaid_fen"),
                              sa.case((fresh, current_micro), (replayed, replay_micro),
                                      else_=current_micro).label("micro"),
                              sa.case((fresh, b.c.late_fee_paid_fen),
                                      (replayed, b.c.late_fee_paid_fen - h.posted_fee + h.eff_fee),
                                      else_=b.c.late_fee_paid_fen).label("fee_paid"))
                    .select_from(b.join(c, cust_join).outerjoin(history, h.bill_id == b.c.bill_id)
                                 .outerjoin(segments, g.bill_id == b.c.bill_id))
                    .where(sa.or_(b.c.paid_on.is_(None), b.c.paid_on > _AS_OF,
                                  b.c.bill_id.in_(sa.select(touched.c.bill_id))),
                           b.c.issued_at < _b("issued_before"), unpaid_either > 0))
        parts = [one_pass]
    else:
        parts = [untouched, touched_part]
    if not snap:
        parts = [q.where(*_in_part(b.c.account_no, part),
                         *((c.c.branch_code == _b("branch_code"),) if branch else ())) for q in parts]
    # Each bill's accrual at as_of (micro) and fee paid by then come out of the union; the fee is rounded from
    # them above it, where the accrual is a column: the rounding names it twice, and inside the union each
    # name would evaluate the whole accrual expression again (MariaDB, SQLite share no subexpression).
    u = (sa.union_all(*parts) if len(parts) > 1 else parts[0]).subquery("arrears_bills")
    if fee_state:
        return u
    fee = fee_due_from_micro_sql(u.c.micro, u.c.fee_paid, rates)
    return sa.select(*(u.c[k] for k in ("bill_id", "account_no", "branch_code", "period",
                                        "unpaid_fen")), sa.cast(fee, sa.BigInteger).label("fee_sql")) \
        .subquery("arrears_bills_typed")


_ARREARS = {(indexed, branch): _arrears_query(branch, indexed=indexed)
            for indexed in (True, False) for branch in (True, False)}
_REPLAY_ALLOCS = (sa.select(T_ALLOC.c.bill_id, T_ALLOC.c.principal_fen, T_ALLOC.c.late_fee_fen, T_PAY.c.state,
                            T_PAY.c.settlement_date, T_PAY.c.reversed_on)
                  .select_from(T_ALLOC.join(T_PAY, T_PAY.c.payment_id == T_ALLOC.c.payment_id))
                  .where(T_ALLOC.c.bill_id.in_(_b("ids", expanding=True)))
                  .order_by(T_ALLOC.c.bill_id, T_PAY.c.settlement_date, T_PAY.c.payment_id))


# ---- collections ----
def collection_summary(engines: Sequence[Engine], from_date: dt.date, to_date: dt.date,
                       group_by: str, bank_id: str = "") -> CollectionReport:
    """Every bank's collections, or only `bank_id`'s when given."""
    check_period(from_date, to_date)
    if group_by not in GROUP_BYS:
        raise InvalidField("group_by", f"must be one of {', '.join(GROUP_BYS)}")
    by_key: dict[str, CollectionRow] = {}
    width = len(_GROUP_COLUMNS[group_by])
    for engine in engines:
        with engine.connect().execution_options(read_only=True) as conn, conn.begin():
            _no_jit(conn)
            rows = conn.execute(_COLLECTIONS[group_by, bool(bank_id)],
                                {"from_day": from_date, "to_day": to_date, "bank_id": bank_id}).all()
        if len(rows) > REPORT_ROWS_MAX:
            raise InvalidField("group_by", f"more than {REPORT_ROWS_MAX} groups: choose a shorter period")
        for r in rows:
            key = "/".join(_key_text(v) for v in r[:width])
            row = CollectionRow(key, int(r.n or 0), int(r.fen or 0), int(r.cn or 0), int(r.cfen or 0))
            by_key.setdefault(key, CollectionRow(key)).add(row)
    total = CollectionRow("TOTAL")
    for row in by_key.values():
        total.add(row)
    return CollectionReport(from_date, to_date, group_by, tuple(by_key[k] for k in sorted(by_key)), total)


def collection_detail(engines: Sequence[Engine], from_date: dt.date, to_date: dt.date, bank_id: str = "",
                      outlet_code: str = "", page_payments: int = DETAIL_PAGE_PAYMENTS
                      ) -> Iterator[list[CollectedPayment]]:
    """The payments of [from, to] (every bank's, or `bank_id`'s; one outlet's when
    given), by settlement date, bank and payment, in pages, one database after another."""
    check_period(from_date, to_date)
    params = {"from_day": from_date, "to_day": to_date, "bank_id": bank_id, "outlet_code": outlet_code}
    for engine in engines:
        with engine.connect().execution_options(read_only=True) as conn, conn.begin():
            _no_jit(conn)
            result = conn.execute(_PAYMENTS_OF_PERIOD, params, execution_options={"yield_per": page_payments})
            for chunk in result.partitions(page_payments):
                yield [_collected(r) for r in chunk]


def _collected(r: Any) -> CollectedPayment:
    posted_at = r.posted_at if r.posted_at.tzinfo else r.posted_at.replace(tzinfo=dt.UTC)  # stored as UTC
    return CollectedPayment(r.bank_id, r.bank_serial, r.account_no or "", r.branch_code, int(r.amount_fen),
                            r.channel, r.outlet_code, r.teller_id,
                            None if r.bank_balance_fen is None else int(r.bank_balance_fen), posted_at,
                            r.settlement_date, r.state, r.reversed_on, int(r.payment_id))


def _no_jit(conn: Connection) -> None:
    """PostgreSQL: compiling a report's plan (JIT) costs seconds more than it saves;
    and a report's aggregates get REPORT_WORK_MEM to hash in memory instead of sorting on disk."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL jit = off")
        conn.exec_driver_sql(f"SET LOCAL work_mem = '{REPORT_WORK_MEM}'")


def _key_text(v: Any) -> str:
    if isinstance(v, dt.date):
        return v.isoformat()
    return "" if v is None else str(v)


# ---- arrears ----
def bills_in_arrears(engines: Sequence[Engine], as_of: dt.date, rates: LateFeeRates, tz: ZoneInfo,
                     branch_code: str = "", *, indexed: bool = True) -> Iterator[tuple[Any, BillAsOf]]:
    """(bill row, what it owed) for every bill in arrears at the end of `as_of`,
    by account then period, one database after another. `indexed=False` reads
    every bill (the reference reconstruction)."""
    cutoff = end_of_day_utc(as_of, tz)
    for engine in engines:
        issued_before = cutoff.replace(tzinfo=None) if engine.dialect.name == "sqlite" else cutoff
        params: dict[str, Any] = {"as_of": as_of, "issued_before": issued_before}
        stmt = _ARREARS[indexed, bool(branch_code)]
        if branch_code:
            params["branch_code"] = branch_code
        with engine.connect().execution_options(read_only=True) as conn, conn.begin(), \
                engine.connect().execution_options(read_only=True) as side:
            _no_jit(conn)
            result = conn.execute(stmt, params, execution_options={"yield_per": ARREARS_CHUNK_ROWS})
            for chunk in result.partitions(ARREARS_CHUNK_ROWS):
                yield from _price_chunk(side, chunk, as_of, rates)


def _price_chunk(side: Connection, chunk: Sequence[Any], as_of: dt.date,
                 rates: LateFeeRates) -> Iterator[tuple[Any, BillAsOf]]:
    replays = {b.bill_id: _Replay() for b in chunk if b.needs_replay}
    if replays:
        with side.begin():
            for a in side.execute(_REPLAY_ALLOCS, {"ids": list(replays)}):
                replays[a.bill_id].allocations.append((a.principal_fen, a.late_fee_fen, a.state,
                                                       a.settlement_date, a.reversed_on))
    for b in chunk:
        unpaid = int(b.unpaid_fen)
        fee = fee_as_of(b, as_of, unpaid, int(b.fee_paid_fen), replays.get(b.bill_id) if replays else None, rates)
        yield b, BillAsOf(b.account_no, b.branch_code, b.period, unpaid, fee)


def arrears_summary(engines: Sequence[Engine], as_of: dt.date, rates: LateFeeRates, tz: ZoneInfo, *,
                    indexed: bool = True) -> ArrearsReport:
    """Arrears by branch at the end of `as_of`. indexed: added up in the
    database (O(branches) rows back, plus the few bills whose history after
    as_of must be replayed); otherwise bill by bill in Python (the reference)."""
    by_branch: dict[str, ArrearsRow] = {}
    if indexed:
        for row in _summed_by_branch(engines, as_of, rates, tz):
            by_branch.setdefault(row.branch_code, ArrearsRow(row.branch_code))
            mine = by_branch[row.branch_code]
            mine.households += row.households
            mine.principal_fen += row.principal_fen
            mine.late_fee_fen += row.late_fee_fen
        return _report(as_of, by_branch)
    last_account = ""
    for _row, bill in bills_in_arrears(engines, as_of, rates, tz, indexed=indexed):
        row = by_branch.setdefault(bill.branch_code, ArrearsRow(bill.branch_code))
        if bill.account_no != last_account:
            row.households += 1
            last_account = bill.account_no
        row.principal_fen += bill.principal_fen
        row.late_fee_fen += bill.late_fee_fen
    return _report(as_of, by_branch)


def _report(as_of: dt.date, by_branch: dict[str, ArrearsRow]) -> ArrearsReport:
    total = ArrearsRow("TOTAL")
    for r in by_branch.values():
        total.households += r.households
        total.principal_fen += r.principal_fen
        total.late_fee_fen += r.late_fee_fen
    return ArrearsReport(as_of, tuple(by_branch[k] for k in sorted(by_branch)), total)


def arrears_detail(engines: Sequence[Engine], as_of: dt.date, rates: LateFeeRates, tz: ZoneInfo,
                   branch_code: str = "", page_accounts: int = DETAIL_PAGE_ACCOUNTS, *, indexed: bool = True
                   ) -> Generator[list[ArrearsAccount], None, None]:
    """Accounts in arrears at the end of `as_of`, by account number, in pages;
    names and phones masked. indexed: each account added up in the database."""
    if indexed:
        yield from _summed_by_account(engines, as_of, rates, tz, branch_code, page_accounts)
        return
    page: list[ArrearsAccount] = []
    current: ArrearsAccount | None = None
    for row, bill in bills_in_arrears(engines, as_of, rates, tz, branch_code, indexed=indexed):
        if current is None or current.account_no != bill.account_no:
            if current is not None:
                page.append(current)
                if len(page) >= page_accounts:
                    yield page
                    page = []
            current = ArrearsAccount(bill.account_no, mask_name(row.name), mask_phone(row.phone), bill.branch_code,
                                     oldest_period=bill.period)
        current.unpaid_bills += 1
        current.principal_fen += bill.principal_fen
        current.late_fee_fen += bill.late_fee_fen
    if current is not None:
        page.append(current)
    if page:
        yield page


# ---- arrears added up in the database ----
@functools.lru_cache(maxsize=32)
def _summed_statements(rates: LateFeeRates, branch: bool, dialect: str,
                       part: tuple[bool, bool] = (False, False), snap: bool = False
                       ) -> tuple[sa.Select[Any], sa.Select[Any]]:
    """(by branch, by account) over the bills in arrears at as_of, every fee priced in the
    database (the bills whose history after as_of changed them replayed set-based); snap: the
    untouched bills read from a snapshot (_arrears_bills)."""
    bills = _arrears_bills(branch, rates, dialect, part, snap)
    total = _sum_bigint
    # by account first, then by branch: a hash aggregate each, where COUNT(DISTINCT) would sort every bill
    grouped = (sa.select(bills.c.branch_code, total(bills.c.unpaid_fen).label("principal_fen"),
                         total(bills.c.fee_sql).label("late_fee_fen"))
               .group_by(bills.c.branch_code, bills.c.account_no))
    accounts = (grouped.order_by(*_UNORDERED) if dialect == "mysql" else grouped).subquery("arrears_accounts")
    by_branch: sa.Select[Any] = (sa.select(accounts.c.branch_code, sa.func.count().label("households"),
                           total(accounts.c.principal_fen).label("principal_fen"),
                           total(accounts.c.late_fee_fen).label("late_fee_fen"))
                 .group_by(accounts.c.branch_code))
    if dialect == "mysql":
        by_branch = by_branch.order_by(*_UNORDERED)  # the branches are put in order in Python (_report)
    # columns in ArrearsAccount's order (rows are read as plain tuples); the name and phone joined to each
    # account once it is added up (carried through the bills they widened every row MariaDB sorts)
    per_account = (sa.select(bills.c.account_no, bills.c.branch_code, sa.func.count().label("unpaid_bills"),
                             total(bills.c.unpaid_fen).label("principal_fen"),
                             total(bills.c.fee_sql).label("late_fee_fen"),
                             sa.func.min(bills.c.period).label("oldest_period"))
                   .group_by(bills.c.account_no, bills.c.branch_code).subquery("arrears_by_account"))
    acc, cust = per_account.c, T_CUST.alias("named")
    columns: tuple[Any, ...] = (acc.account_no, cust.c.name, cust.c.phone, acc.branch_code, acc.unpaid_bills,
                                acc.principal_fen, acc.late_fee_fen, acc.oldest_period)
    if dialect == "mysql":
        # pymysql decodes every column of every row in Python: the six fields that are codes or integers
        # travel as one text column (_PACKED), the free-text name and phone as their own
        columns = (sa.func.concat_ws(sa.func.char(_PACK_SEP_CODE),
                                     *(sa.func.coalesce(x, "") for x in (acc.account_no, acc.branch_code,
                                                                         acc.unpaid_bills, acc.principal_fen,
                                                                         acc.late_fee_fen, acc.oldest_period)))
                   .label("packed"), cust.c.name, cust.c.phone)
    by_account = (sa.select(*columns)
                  .select_from(per_account.join(cust, cust.c.account_no == acc.account_no))
                  .order_by(acc.account_no))
    return by_branch, by_account


_PACK_SEP_CODE = 31  # ASCII unit separator: never in an account number, branch code, integer or period
_PACK_SEP = chr(_PACK_SEP_CODE)
_PACKED_FIELDS = 6


def _unpacked(packed: str, name: str, phone: str) -> ArrearsAccount:
    """An ArrearsAccount from MariaDB's packed row (_summed_statements): exactly _PACKED_FIELDS fields or the
    report fails (a code holding the separator would shift them), never a misread figure."""
    fields = packed.split(_PACK_SEP)
    if len(fields) != _PACKED_FIELDS:
        raise ValueError(f"arrears detail: a packed account row has {len(fields)} fields, not {_PACKED_FIELDS}")
    account_no, branch, n, principal_fen, fee_fen, oldest = fields
    return ArrearsAccount(account_no, mask_name(name), mask_phone(phone), branch, int(n), int(principal_fen),
                          int(fee_fen or 0), oldest)


def _params(engine: Engine, as_of: dt.date, tz: ZoneInfo, branch_code: str) -> dict[str, Any]:
    cutoff = end_of_day_utc(as_of, tz)
    params: dict[str, Any] = {"as_of": as_of,
                              "issued_before": cutoff.replace(tzinfo=None) if engine.dialect.name == "sqlite" else cutoff}
    if branch_code:
        params["branch_code"] = branch_code
    return params


# MariaDB engines of the report's temporary tables, in order of preference: MEMORY (up to
# REPORT_TMP_TABLE_BYTES; measured on 100k touched bills of a past date: 0.4-0.6 s of server CPU where the
# default InnoDB temporary table took 0.6-0.9 s), then Aria (no size limit) when MEMORY is full.
_TMP_ENGINES = ("MEMORY", "Aria")
_ER_RECORD_FILE_FULL = 1114


@contextlib.contextmanager
def _materialised(conn: Connection, params: dict[str, Any], rates: LateFeeRates,
                  part: tuple[bool, bool] = (False, False), snap: bool = False) -> Iterator[None]:
    """MariaDB: the touched bills of the report's as-of date, their histories and their replayed segments
    (_touched_select, _history_select, _segments_select) as temporary tables of this session, keyed by bill,
    each computed once, dropped afterwards (in memory while they fit in REPORT_TMP_TABLE_BYTES, else on
    disk). Nothing elsewhere. snap: the bills a report reading a snapshot replays (_touched_since_snapshot)."""
    if conn.dialect.name != "mysql":
        yield
        return
    saved = conn.exec_driver_sql("SELECT @@tmp_table_size, @@max_heap_table_size").one()
    try:
        conn.exec_driver_sql(f"SET SESSION tmp_table_size = {REPORT_TMP_TABLE_BYTES}, "
                             f"max_heap_table_size = {REPORT_TMP_TABLE_BYTES}")
        for name, key, select in (
                (_TMP_TOUCHED, "PRIMARY KEY (bill_id)", _touched_since_snapshot(part) if snap else _touched_select(part)),
                (_TMP_HISTORY, "PRIMARY KEY (bill_id)", _history_select(_TMP_TOUCHED_TABLE).order_by(*_UNORDERED)),
                (_TMP_SEGMENTS, "PRIMARY KEY (bill_id)",
                 _segments_select(_TMP_TOUCHED_TABLE, rates, "mysql"))):
            compiled = select.compile(dialect=conn.dialect)
            for tmp_engine in _TMP_ENGINES:
                conn.exec_driver_sql(f"DROP TEMPORARY TABLE IF EXISTS {name}")
                try:
                    conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {name} ({key}) ENGINE={tmp_engine} {compiled}",
                                         {**compiled.params, **{k: v for k, v in params.items()
                                                                if k in compiled.params}})
                    break
                except sa.exc.OperationalError as e:
                    if tmp_engine == _TMP_ENGINES[-1] or e.orig is None or e.orig.args[0] != _ER_RECORD_FILE_FULL:
                        raise
        yield
    finally:
        for name in (_TMP_SEGMENTS, _TMP_HISTORY, _TMP_TOUCHED):
            conn.exec_driver_sql(f"DROP TEMPORARY TABLE IF EXISTS {name}")
        conn.exec_driver_sql(f"SET SESSION tmp_table_size = {int(saved[0])}, max_heap_table_size = {int(saved[1])}")


@dataclass(frozen=True)
class _Part:
    """The accounts one connection of a report adds up: [part_from, part_to), either end open."""
    flags: tuple[bool, bool] = (False, False)
    params: dict[str, str] = field(default_factory=dict)


def _parts(engine: Engine) -> list[_Part]:
    """The report's parts, in account order, covering every account once: REPORT_PARTS_MARIADB ranges of
    accounts of about equal size on MariaDB (which runs a statement on one core; each part is a connection
    of its own, run at the same time), the whole database elsewhere (PostgreSQL runs its own workers)."""
    if engine.dialect.name != "mysql" or REPORT_PARTS_MARIADB < 2:
        return [_Part()]
    with engine.connect().execution_options(read_only=True) as conn, conn.begin():
        n = int(conn.execute(_COUNT_CUSTOMERS).scalar_one())
        bounds = sorted({b for i in range(1, REPORT_PARTS_MARIADB)
                         if (b := conn.execute(_NTH_ACCOUNT, {"k": n * i // REPORT_PARTS_MARIADB}).scalar())
                         is not None})
    if not bounds:
        return [_Part()]
    edges: list[str | None] = [None, *bounds, None]
    parts = []
    for low, high in zip(edges, edges[1:], strict=False):
        params = ({"part_from": low} if low is not None else {}) | ({"part_to": high} if high is not None else {})
        parts.append(_Part((low is not None, high is not None), params))
    return parts


def _report_connection(engine: Engine) -> Connection:
    """A read-only connection whose transaction reads one snapshot of the database throughout (PostgreSQL:
    REPEATABLE READ, so that the snapshot check and the report read the same data; MariaDB's InnoDB and
    SQLite already do)."""
    conn = engine.connect()
    options: dict[str, Any] = {"read_only": True}
    if engine.dialect.name == "postgresql":
        options["isolation_level"] = "REPEATABLE READ"
    return conn.execution_options(**options)


# The newest READY snapshot of a day on or before as_of that is still exact: no reconciliation of a day on or
# before its day committed since it was taken (arrears_snapshot.py: nothing else dated on or before a closed
# day is written after the snapshot job's wait).
_R = T_RECON.alias("r")
_SNAPSHOT_OF = (sa.select(T_SNAP.c.as_of, T_SNAP.c.bills_upto)
                .where(T_SNAP.c.state == READY, T_SNAP.c.as_of <= _AS_OF, T_SNAP.c.format == SNAPSHOT_FORMAT,
                       T_SNAP.c.rates == _b("rates"),
                       T_SNAP.c.reconciled_count == sa.select(sa.func.count()).select_from(_R)
                       .where(_R.c.settlement_date <= T_SNAP.c.as_of).scalar_subquery())
                .order_by(T_SNAP.c.as_of.desc()).limit(1))


def rates_key(rates: LateFeeRates) -> str:
    """The late-fee rates as a snapshot records them (arrears_snapshots.rates): a snapshot's accruals were
    computed with them, so a report reads it only with the same rates."""
    return (f"{rates.residential_ppm_per_day}/{rates.other_current_year_ppm_per_day}/"
            f"{rates.other_earlier_years_ppm_per_day}/{rates.minimum_fen}")


def _snapshot_of(conn: Connection, as_of: dt.date, rates: LateFeeRates) -> dict[str, Any] | None:
    """The parameters of the snapshot a report as of `as_of` reads (snap_day, bills_upto), or None (every bill
    is read): in the report's own transaction, so that the check and the report see the same data."""
    if not ARREARS_SNAPSHOTS:
        return None
    row = conn.execute(_SNAPSHOT_OF, {"as_of": as_of, "rates": rates_key(rates)}).first()
    if row is None:
        return None
    if conn.dialect.name == "postgresql" and int(conn.execute(
            _CHANGED_SINCE, {"snap_day": row.as_of, "as_of": as_of,
                             "n": ARREARS_SNAPSHOT_PG_CHANGED_MAX + 1}).scalar_one()) \
            > ARREARS_SNAPSHOT_PG_CHANGED_MAX:
        return None
    return {"snap_day": row.as_of, "bills_upto": int(row.bills_upto)}


# Payments settled or reversed in (the snapshot's day, as_of], counted up to :n (by their indexes): the
# touched bills a report reading the snapshot replays are theirs (_touched_since_snapshot).
_CHANGED_SINCE = sa.select(sa.func.count()).select_from(sa.union_all(
    sa.select(T_PAY.c.payment_id).where(T_PAY.c.settlement_date > _SNAP_DAY, T_PAY.c.settlement_date <= _AS_OF)
    .limit(_b("n", type_=sa.Integer)),
    sa.select(T_PAY.c.payment_id).where(T_PAY.c.reversed_on > _SNAP_DAY, T_PAY.c.reversed_on <= _AS_OF)
    .limit(_b("n", type_=sa.Integer)))
    .subquery("changed_since"))


_COUNT_CUSTOMERS = sa.select(sa.func.count()).select_from(T_CUST)
_NTH_ACCOUNT = (sa.select(T_CUST.c.account_no).order_by(T_CUST.c.account_no).limit(1)
                .offset(_b("k", type_=sa.Integer)))


def _at_once(parts: Sequence[_Part], run: Callable[[_Part], Any],
             undo: Callable[[Any], None] | None = None) -> list[Any]:
    """run(part) for every part, the first on this thread and the others each on a thread of its own, at
    the same time; their results in the parts' order. Each waits for its own statements only, as a
    one-connection report does. When one fails, the first failure is raised once every part has ended,
    after undo(result) of each part that succeeded."""
    if len(parts) == 1:
        return [run(parts[0])]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(parts) - 1,
                                               thread_name_prefix="report-part") as pool:
        others = [pool.submit(run, part) for part in parts[1:]]
        try:
            first = run(parts[0])
        except BaseException:
            concurrent.futures.wait(others)
            for f in others:
                if undo is not None and f.exception() is None:
                    undo(f.result())
            raise
        concurrent.futures.wait(others)
        failures = [e for f in others if (e := f.exception()) is not None]
        if failures:
            for result in (first, *(f.result() for f in others if f.exception() is None)):
                if undo is not None:
                    undo(result)
            raise failures[0]
        return [first, *(f.result() for f in others)]


def _summed_by_branch(engines: Sequence[Engine], as_of: dt.date, rates: LateFeeRates,
                      tz: ZoneInfo) -> Iterator[ArrearsRow]:
    for engine in engines:
        params = _params(engine, as_of, tz, "")

        def by_branch_of(part: _Part, engine: Engine = engine, params: dict[str, Any] = params) -> list[Any]:
            with _report_connection(engine) as conn, conn.begin():
                snap = _snapshot_of(conn, as_of, rates)
                by_branch, _by_account = _summed_statements(rates, False, engine.dialect.name, part.flags,
                                                            snap is not None)
                mine = {**params, **part.params, **(snap or {})}
                with _materialised(conn, mine, rates, part.flags, snap is not None):
                    _no_jit(conn)
                    return list(conn.execute(by_branch, mine).all())

        for rows in _at_once(_parts(engine), by_branch_of):
            yield from (ArrearsRow(r.branch_code, int(r.households), int(r.principal_fen or 0),
                                   int(r.late_fee_fen or 0)) for r in rows)


def _summed_by_account(engines: Sequence[Engine], as_of: dt.date, rates: LateFeeRates, tz: ZoneInfo,
                       branch_code: str, page_accounts: int) -> Iterator[list[ArrearsAccount]]:
    """Every part's statement is started at once (_at_once); the parts are then read one after another, in
    account order, each streamed (its rows wait in the database until read)."""
    page: list[ArrearsAccount] = []
    for engine in engines:
        params = _params(engine, as_of, tz, branch_code)

        def started(part: _Part, engine: Engine = engine, params: dict[str, Any] = params
                    ) -> tuple[contextlib.ExitStack, Any]:
            with contextlib.ExitStack() as stack:
                conn = stack.enter_context(_report_connection(engine))
                stack.enter_context(conn.begin())
                snap = _snapshot_of(conn, as_of, rates)
                _by_branch, by_account = _summed_statements(rates, bool(branch_code), engine.dialect.name,
                                                            part.flags, snap is not None)
                mine = {**params, **part.params, **(snap or {})}
                stack.enter_context(_materialised(conn, mine, rates, part.flags, snap is not None))
                _no_jit(conn)
                result = conn.execute(by_account, mine, execution_options={"yield_per": ARREARS_CHUNK_ROWS})
                stack.callback(result.close)
                return stack.pop_all(), result

        opened = _at_once(_parts(engine), started, undo=lambda opened: opened[0].close())
        try:
            packed = engine.dialect.name == "mysql"
            for _stack, result in opened:
                for row in result:
                    if packed:
                        page.append(_unpacked(*row))
                    else:
                        account_no, name, phone, branch, n, principal_fen, fee_fen, oldest = row
                        page.append(ArrearsAccount(account_no, mask_name(name), mask_phone(phone), branch, n,
                                                   principal_fen, fee_fen or 0, oldest))
                    if len(page) >= page_accounts:
                        yield page
                        page = []
        finally:
            for stack, _result in opened:
                stack.close()
    if page:
        yield page
