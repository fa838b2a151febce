"""What the utility's customer channels read and record (CustomerService):
a household's overview for the portal and the IVR, the dunning candidates,
dunning attempts and the opt-out list, over SQLAlchemy Core on the account's
branch database. Late fees come from late_fee.py through payments.bills_due,
as of the injected clock's business date, so an overview's arrears, late fee
and total always equal QueryAccount's for the same account and instant.

Must never: tell an unknown account from a wrong phone factor (one exception,
one message), return a full name, address or phone number outside the
dunning candidates, or change a final dunning outcome."""
from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from mis_adapter.context import AdapterContext
from mis_adapter.db.base import table_of
from mis_adapter.db.core import AllocationRow, BillRow, Customer, Payment
from mis_adapter.db.dunning import DunningAttemptRow, DunningOptOut
from mis_adapter.payments import _db_call, bills_due
from yindian_common.clock import business_date, utc_now
from yindian_common.errors import AccountNotFound, SerialConflict
from yindian_common.fields import mask_name

T_CUST = table_of(Customer)
T_BILL = table_of(BillRow)
T_PAY = table_of(Payment)
T_ALLOC = table_of(AllocationRow)
T_ATTEMPT = table_of(DunningAttemptRow)
T_OPT = table_of(DunningOptOut)

# One message for an unknown account and a wrong factor: nothing to enumerate with.
NO_MATCH_MESSAGE = "no account matches this account number and phone"
ADDRESS_SHOWN_MAX = 6
FINAL_OUTCOMES = frozenset({"ANSWERED", "NO_ANSWER", "BUSY", "FAILED", "SKIPPED_PAID", "SKIPPED_OPT_OUT"})
POSTED = "POSTED"

_b = sa.bindparam
_CUSTOMER = sa.select(T_CUST.c.account_no, T_CUST.c.branch_code, T_CUST.c.name, T_CUST.c.address,
                      T_CUST.c.phone, T_CUST.c.tariff_class, T_CUST.c.status,
                      T_CUST.c.prepaid_fen).where(T_CUST.c.account_no == _b("account_no"))
_BILL_COLUMNS = (T_BILL.c.bill_id, T_BILL.c.period, T_BILL.c.kwh, T_BILL.c.amount_fen, T_BILL.c.prepaid_applied_fen,
                 T_BILL.c.principal_paid_fen, T_BILL.c.late_fee_paid_fen, T_BILL.c.accrual_micro,
                 T_BILL.c.accrual_date, T_BILL.c.due_date, T_BILL.c.status, T_BILL.c.paid_on)
# The same selection and order as QueryAccount's, so the totals agree.
_UNPAID_BILLS = (sa.select(*_BILL_COLUMNS).where(T_BILL.c.account_no == _b("account_no"), T_BILL.c.status != "PAID")
                 .order_by(T_BILL.c.period, T_BILL.c.bill_id))
_LATEST_BILLS = (sa.select(*_BILL_COLUMNS).where(T_BILL.c.account_no == _b("account_no"))
                 .order_by(T_BILL.c.period.desc(), T_BILL.c.bill_id.desc()).limit(_b("n")))
_BILL_CHANNELS = (sa.select(T_ALLOC.c.bill_id, T_PAY.c.channel)
                  .join(T_PAY, T_PAY.c.payment_id == T_ALLOC.c.payment_id)
                  .where(T_ALLOC.c.bill_id.in_(_b("ids", expanding=True)), T_PAY.c.state == POSTED)
                  .order_by(T_PAY.c.posted_at, T_PAY.c.payment_id))
_LAST_PAYMENT = (sa.select(T_PAY.c.settlement_date, T_PAY.c.amount_fen, T_PAY.c.channel)
                 .where(T_PAY.c.account_no == _b("account_no"), T_PAY.c.state == POSTED)
                 .order_by(T_PAY.c.posted_at.desc(), T_PAY.c.payment_id.desc()).limit(1))
_UNPAID_FEN = T_BILL.c.amount_fen - T_BILL.c.prepaid_applied_fen - T_BILL.c.principal_paid_fen
_ARREARS_BY_ACCOUNT = (sa.select(T_BILL.c.account_no)
                       .where(T_BILL.c.status != "PAID", T_BILL.c.account_no > _b("after"))
                       .group_by(T_BILL.c.account_no)
                       .having(sa.func.sum(_UNPAID_FEN) >= _b("min_arrears_fen"),
                               sa.func.sum(_UNPAID_FEN) > 0,
                               sa.func.min(T_BILL.c.due_date) <= _b("cutoff", type_=sa.Date))
                       .order_by(T_BILL.c.account_no).limit(_b("n")))
_CUSTOMERS_IN = (sa.select(T_CUST.c.account_no, T_CUST.c.branch_code, T_CUST.c.name, T_CUST.c.phone,
                           T_CUST.c.tariff_class).where(T_CUST.c.account_no.in_(_b("accts", expanding=True))))
_UNPAID_BILLS_IN = (sa.select(T_BILL.c.account_no, *_BILL_COLUMNS)
                    .where(T_BILL.c.account_no.in_(_b("accts", expanding=True)), T_BILL.c.status != "PAID")
                    .order_by(T_BILL.c.account_no, T_BILL.c.period, T_BILL.c.bill_id))
_OPTED_OUT_IN = sa.select(T_OPT.c.account_no).where(T_OPT.c.account_no.in_(_b("accts", expanding=True)),
                                                    T_OPT.c.opted_out.is_(True))
_CUSTOMER_EXISTS = sa.select(T_CUST.c.account_no).where(T_CUST.c.account_no == _b("account_no"))
_ATTEMPT_BY_KEY = sa.select(T_ATTEMPT).where(T_ATTEMPT.c.campaign_id == _b("campaign_id"),
                                             T_ATTEMPT.c.account_no == _b("account_no"),
                                             T_ATTEMPT.c.attempt_no == _b("attempt_no"))
_OPT_OUT_OF = sa.select(T_OPT).where(T_OPT.c.account_no == _b("account_no"))


# ---- domain types ----
@dataclass(frozen=True)
class OverviewBill:
    period: str
    kwh: int
    amount_fen: int
    principal_due_fen: int
    late_fee_due_fen: int
    late_fee_paid_fen: int
    status: str
    due_date: dt.date
    paid_date: dt.date | None
    last_payment_channel: str  # "" when no payment settled part of it
    prepaid_applied_fen: int


@dataclass(frozen=True)
class LastPayment:
    date: dt.date
    amount_fen: int
    channel: str


@dataclass(frozen=True)
class Overview:
    account_no: str
    customer_name: str  # masked
    address: str  # masked
    branch_code: str
    arrears_fen: int
    late_fee_fen: int
    prepaid_fen: int
    earliest_unpaid_due_date: dt.date | None
    bills: tuple[OverviewBill, ...]  # newest first
    last_payment: LastPayment | None
    as_of: dt.date
    closed: bool

    @property
    def total_due_fen(self) -> int:
        return self.arrears_fen + self.late_fee_fen


@dataclass(frozen=True)
class DunningCandidate:
    account_no: str
    customer_name: str  # masked
    phone: str  # full: only the dunning process may ask for candidates
    branch_code: str
    arrears_fen: int
    late_fee_fen: int
    oldest_due_date: dt.date
    days_overdue: int
    unpaid_bills: int
    opted_out: bool

    @property
    def total_due_fen(self) -> int:
        return self.arrears_fen + self.late_fee_fen


@dataclass(frozen=True)
class CandidatePage:
    candidates: tuple[DunningCandidate, ...]
    next_after: str  # "" on the last page
    as_of: dt.date


@dataclass(frozen=True)
class AttemptCommand:
    campaign_id: str
    account_no: str
    attempt_no: int
    outcome: str
    at: dt.datetime
    detail: str
    operator: str


@dataclass(frozen=True)
class Attempt:
    campaign_id: str
    account_no: str
    attempt_no: int
    outcome: str
    placed_at: dt.datetime
    outcome_at: dt.datetime
    detail: str


@dataclass(frozen=True)
class OptOut:
    account_no: str
    opted_out: bool
    updated_at: dt.datetime


# ---- pure rules ----
def mask_address(address: str) -> str:
    """The leading place names kept, the rest starred: 北京市朝阳区******, 黄河路*********.
    Stops at the first digit (house and flat numbers identify a household), after
    ADDRESS_SHOWN_MAX characters, and at half the address."""
    shown = 0
    limit = min(ADDRESS_SHOWN_MAX, len(address) // 2)
    while shown < limit and not address[shown].isdigit():
        shown += 1
    return address[:shown] + "*" * (len(address) - shown)


def phone_matches(phone: str, last4: str) -> bool:
    """Constant-time comparison of the registered phone's last four digits."""
    digits = "".join(c for c in phone if c.isdigit())
    return hmac.compare_digest(digits[-4:].encode(), last4.encode()) and len(digits) >= 4


def next_attempt_state(stored: str, incoming: str) -> str:
    """What a RecordDunningAttempt does to a stored attempt: 'replay' (nothing
    changes), 'complete' (a PLACED attempt gets its final outcome) or 'conflict'."""
    if incoming == stored or (incoming == "PLACED" and stored in FINAL_OUTCOMES):
        return "replay"
    if stored == "PLACED" and incoming in FINAL_OUTCOMES:
        return "complete"
    return "conflict"


def _aware(t: dt.datetime) -> dt.datetime:
    # SQLite and MariaDB hand back naive datetimes; we store UTC.
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


# ---- overview ----
def account_overview(ctx: AdapterContext, account_no: str, phone_last4: str | None, months: int) -> Overview:
    """`phone_last4=None` only for a caller authenticated otherwise (checked at the edge)."""
    return _db_call(_account_overview, ctx, account_no, phone_last4, months)  # type: ignore[no-any-return]


def _account_overview(ctx: AdapterContext, account_no: str, phone_last4: str | None, months: int) -> Overview:
    day = business_date(ctx.clock)
    engine = ctx.router.engine_for(account_no)
    with engine.connect().execution_options(read_only=True) as conn, conn.begin():
        cust = conn.execute(_CUSTOMER, {"account_no": account_no}).first()
        if cust is None or (phone_last4 is not None and not phone_matches(cust.phone, phone_last4)):
            raise AccountNotFound(NO_MATCH_MESSAGE)
        unpaid = conn.execute(_UNPAID_BILLS, {"account_no": account_no}).all()
        latest = conn.execute(_LATEST_BILLS, {"account_no": account_no, "n": months}).all()
        channels: dict[int, str] = {}
        if latest:
            for r in conn.execute(_BILL_CHANNELS, {"ids": [b.bill_id for b in latest]}):
                channels[r.bill_id] = r.channel  # ordered by posting time: the last one wins
        last = conn.execute(_LAST_PAYMENT, {"account_no": account_no}).first()
    due = bills_due(unpaid, cust.tariff_class, day, ctx.rates)
    due_by_bill = {d.bill_id: d for _, d, _ in due}
    bills = tuple(_overview_bill(b, due_by_bill.get(b.bill_id), channels.get(b.bill_id, "")) for b in latest)
    return Overview(
        account_no, mask_name(cust.name), mask_address(cust.address), cust.branch_code,
        sum(d.principal_due_fen for _, d, _ in due), sum(d.late_fee_due_fen for _, d, _ in due), cust.prepaid_fen,
        min((r.due_date for r in unpaid), default=None), bills,
        LastPayment(last.settlement_date, last.amount_fen, last.channel) if last is not None else None,
        day, cust.status != "OPEN")


def _overview_bill(b: Any, due: Any, channel: str) -> OverviewBill:
    return OverviewBill(b.period, b.kwh, b.amount_fen, due.principal_due_fen if due else 0,
                        due.late_fee_due_fen if due else 0, b.late_fee_paid_fen, b.status, b.due_date,
                        b.paid_on if b.status == "PAID" else None, channel, b.prepaid_applied_fen)


# ---- dunning candidates ----
def dunning_candidates(ctx: AdapterContext, as_of: dt.date, min_arrears_fen: int, min_days_overdue: int,
                       page_size: int, after: str) -> CandidatePage:
    return _db_call(_dunning_candidates, ctx, as_of, min_arrears_fen, min_days_overdue,  # type: ignore[no-any-return]
                    page_size, after)


def _dunning_candidates(ctx: AdapterContext, as_of: dt.date, min_arrears_fen: int, min_days_overdue: int,
                        page_size: int, after: str) -> CandidatePage:
    # A bill not yet past its due date is not dunned: at least one day overdue.
    cutoff = as_of - dt.timedelta(days=max(1, min_days_overdue))
    found: list[DunningCandidate] = []
    for engine in ctx.router.engines():
        found.extend(_candidates_in(ctx, engine, as_of, cutoff, min_arrears_fen, page_size + 1, after))
    found.sort(key=lambda c: c.account_no)
    page = tuple(found[:page_size])
    more = len(found) > page_size
    return CandidatePage(page, page[-1].account_no if more and page else "", as_of)


def _candidates_in(ctx: AdapterContext, engine: Engine, as_of: dt.date, cutoff: dt.date, min_arrears_fen: int,
                   limit: int, after: str) -> list[DunningCandidate]:
    with engine.connect().execution_options(read_only=True) as conn, conn.begin():
        accts = [r.account_no for r in conn.execute(_ARREARS_BY_ACCOUNT, {
            "after": after, "min_arrears_fen": min_arrears_fen, "cutoff": cutoff, "n": limit})
            # an account routed to another branch database is that database's to report
            if ctx.router.engine_for(r.account_no) is engine]
        if not accts:
            return []
        customers = {c.account_no: c for c in conn.execute(_CUSTOMERS_IN, {"accts": accts})}
        bills: dict[str, list[Any]] = {}
        for b in conn.execute(_UNPAID_BILLS_IN, {"accts": accts}):
            bills.setdefault(b.account_no, []).append(b)
        opted_out = {r.account_no for r in conn.execute(_OPTED_OUT_IN, {"accts": accts})}
    return [_candidate(customers[a], bills[a], as_of, ctx, a in opted_out) for a in accts if a in customers]


def _candidate(cust: Any, rows: Sequence[Any], as_of: dt.date, ctx: AdapterContext, opted_out: bool
               ) -> DunningCandidate:
    due = bills_due(rows, cust.tariff_class, as_of, ctx.rates)
    oldest = min(r.due_date for r in rows)
    return DunningCandidate(cust.account_no, mask_name(cust.name), cust.phone, cust.branch_code,
                            sum(d.principal_due_fen for _, d, _ in due), sum(d.late_fee_due_fen for _, d, _ in due),
                            oldest, (as_of - oldest).days, len(rows), opted_out)


# ---- dunning attempts ----
def record_attempt(ctx: AdapterContext, cmd: AttemptCommand) -> tuple[Attempt, bool]:
    """(the stored attempt, replayed)."""
    engine = ctx.router.engine_for(cmd.account_no)
    try:
        return _db_call(_record_attempt, ctx, engine, cmd)  # type: ignore[no-any-return]
    except IntegrityError:
        # The same key was inserted concurrently: answer as the second request would have.
        return _db_call(_record_attempt, ctx, engine, cmd)  # type: ignore[no-any-return]


def _require_account(conn: Connection, account_no: str) -> None:
    if conn.execute(_CUSTOMER_EXISTS, {"account_no": account_no}).first() is None:
        raise AccountNotFound(f"account {account_no} not found")


def _record_attempt(ctx: AdapterContext, engine: Engine, cmd: AttemptCommand) -> tuple[Attempt, bool]:
    now = utc_now(ctx.clock)
    key = {"campaign_id": cmd.campaign_id, "account_no": cmd.account_no, "attempt_no": cmd.attempt_no}
    with engine.begin() as conn:
        _require_account(conn, cmd.account_no)
        row = conn.execute(_ATTEMPT_BY_KEY.with_for_update(), key).first()
        if row is None:
            conn.execute(T_ATTEMPT.insert().values(**key, outcome=cmd.outcome, placed_at=cmd.at, outcome_at=cmd.at,
                                                   detail=cmd.detail, operator=cmd.operator, recorded_at=now))
            return Attempt(cmd.campaign_id, cmd.account_no, cmd.attempt_no, cmd.outcome, cmd.at, cmd.at,
                           cmd.detail), False
        action = next_attempt_state(row.outcome, cmd.outcome)
        if action == "replay":
            return _attempt_of(row), True
        if action == "conflict":
            raise SerialConflict(f"attempt {cmd.attempt_no} of campaign {cmd.campaign_id} already has outcome "
                                 f"{row.outcome}", reason="ATTEMPT_CONFLICT")
        conn.execute(T_ATTEMPT.update().where(T_ATTEMPT.c.attempt_id == row.attempt_id)
                     .values(outcome=cmd.outcome, outcome_at=cmd.at, detail=cmd.detail or row.detail,
                             operator=cmd.operator, recorded_at=now))
        return Attempt(cmd.campaign_id, cmd.account_no, cmd.attempt_no, cmd.outcome, _aware(row.placed_at), cmd.at,
                       cmd.detail or row.detail), False


def _attempt_of(row: Any) -> Attempt:
    return Attempt(row.campaign_id, row.account_no, row.attempt_no, row.outcome, _aware(row.placed_at),
                   _aware(row.outcome_at), row.detail)


def list_attempts(ctx: AdapterContext, account_no: str, since: dt.datetime | None, campaign_id: str,
                  limit: int) -> tuple[tuple[Attempt, ...], bool]:
    """(attempts oldest first, truncated)."""
    return _db_call(_list_attempts, ctx, account_no, since, campaign_id, limit)  # type: ignore[no-any-return]


def _list_attempts(ctx: AdapterContext, account_no: str, since: dt.datetime | None, campaign_id: str,
                   limit: int) -> tuple[tuple[Attempt, ...], bool]:
    stmt = sa.select(T_ATTEMPT).where(T_ATTEMPT.c.account_no == account_no)
    if since is not None:
        stmt = stmt.where(T_ATTEMPT.c.placed_at >= since)
    if campaign_id:
        stmt = stmt.where(T_ATTEMPT.c.campaign_id == campaign_id)
    stmt = stmt.order_by(T_ATTEMPT.c.placed_at, T_ATTEMPT.c.attempt_id).limit(limit + 1)
    with ctx.router.engine_for(account_no).connect().execution_options(read_only=True) as conn, conn.begin():
        _require_account(conn, account_no)
        rows = conn.execute(stmt).all()
    return tuple(_attempt_of(r) for r in rows[:limit]), len(rows) > limit


# ---- opt-outs ----
def set_opt_out(ctx: AdapterContext, account_no: str, opted_out: bool, reason: str, operator: str) -> OptOut:
    engine = ctx.router.engine_for(account_no)
    try:
        return _db_call(_set_opt_out, ctx, engine, account_no, opted_out, reason, operator)  # type: ignore[no-any-return]
    except IntegrityError:
        # Two first-time opt-outs raced on the primary key: the second is an update.
        return _db_call(_set_opt_out, ctx, engine, account_no, opted_out, reason, operator)  # type: ignore[no-any-return]


def _set_opt_out(ctx: AdapterContext, engine: Engine, account_no: str, opted_out: bool, reason: str,
                 operator: str) -> OptOut:
    now = utc_now(ctx.clock)
    values = {"opted_out": opted_out, "reason": reason, "operator": operator, "updated_at": now}
    with engine.begin() as conn:
        _require_account(conn, account_no)
        if conn.execute(_OPT_OUT_OF.with_for_update(), {"account_no": account_no}).first() is None:
            conn.execute(T_OPT.insert().values(account_no=account_no, **values))
        else:
            conn.execute(T_OPT.update().where(T_OPT.c.account_no == account_no).values(**values))
    return OptOut(account_no, opted_out, now)
