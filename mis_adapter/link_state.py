"""A bank's link state as the utility records it (签到 / 日终签退), which
moves the settlement date a payment gets (allocation.settlement_date), and the
bank's refund configuration.

Rules (README "Sign-on, sign-off, echo"):
- SignOn records the bank as open for today's business; SignOff closes its
  business day on the link. Both are idempotent (the state is set, not
  toggled) and journaled.
- After a sign-off on day D, a new payment (counter or auto-debit) made on
  D settles on D+1, like a payment after the day was reconciled: the bank
  closed its books for D. It is never refused for that alone. A sign-on
  restores same-day settlement (unless the day is reconciled).
- A bank that never signed on or off (no row) is served as open: links
  that predate sign-on keep working.
- The utility's suspension (停工) overrides every state: money-moving calls
  get UNAVAILABLE BANK_SUSPENDED whether signed on or not; a sign-on while
  suspended is recorded and answered with `suspended`.

The first half is pure; the second is storage (SQLAlchemy Core)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mis_adapter.db.base import table_of
from mis_adapter.db.core import Bank, JournalEntry
from mis_adapter.db.link import BankLink
from yindian_common.errors import Forbidden, InvalidField

__all__ = [
    "SIGNED_ON", "SIGNED_OFF", "OPEN", "PREPAID", "REFUND", "REFUND_MODES", "LinkView",
    "signed_off_for", "signed_off_on", "sign_on", "sign_off", "read_link", "set_refund_mode", "refund_mode",
    "SIGNED_OFF_TODAY", "link_states", "mirror",
]

SIGNED_ON, SIGNED_OFF = "SIGNED_ON", "SIGNED_OFF"
OPEN = "OPEN"  # no row: never signed on or off, served as open
PREPAID, REFUND = "PREPAID", "REFUND"
REFUND_MODES = (PREPAID, REFUND)


@dataclass(frozen=True)
class LinkView:
    bank_id: str
    state: str                      # SIGNED_ON, SIGNED_OFF or OPEN (never signed on or off)
    business_date: dt.date | None
    changed_at: dt.datetime | None
    refund_mode: str
    suspended: bool


# ---- pure ----

def signed_off_for(state: str, business_date: dt.date | None, today: dt.date) -> bool:
    """True when the bank closed `today` (or a later day) on the link."""
    return state == SIGNED_OFF and business_date is not None and business_date >= today


# ---- storage ----

T_LINK = table_of(BankLink)
T_BANKS = table_of(Bank)
T_JOURNAL = table_of(JournalEntry)
_b = sa.bindparam

_READ = sa.select(T_BANKS.c.bank_id, T_BANKS.c.suspended, T_LINK.c.state, T_LINK.c.business_date,
                  T_LINK.c.changed_at, T_LINK.c.refund_mode).select_from(
    T_BANKS.outerjoin(T_LINK, T_LINK.c.bank_id == T_BANKS.c.bank_id)).where(T_BANKS.c.bank_id == _b("bank_id"))
_ALL = sa.select(T_BANKS.c.bank_id, T_BANKS.c.suspended, T_LINK.c.state, T_LINK.c.business_date,
                 T_LINK.c.changed_at, T_LINK.c.refund_mode).select_from(
    T_BANKS.outerjoin(T_LINK, T_LINK.c.bank_id == T_BANKS.c.bank_id)).order_by(T_BANKS.c.bank_id)
_SET_STATE = (T_LINK.update().where(T_LINK.c.bank_id == _b("p_bank"))
              .values(state=_b("p_state"), business_date=_b("p_day"), changed_at=_b("p_at")))
_SET_MODE = T_LINK.update().where(T_LINK.c.bank_id == _b("p_bank")).values(refund_mode=_b("p_mode"))
_LOCK_ROW = sa.select(T_LINK.c.bank_id).where(T_LINK.c.bank_id == _b("bank_id")).with_for_update()
_OFF = sa.select(T_LINK.c.state, T_LINK.c.business_date).where(T_LINK.c.bank_id == _b("bank_id"))

# For a payment statement that already binds :bank_id and :day (mis_adapter.payments):
# true when the bank signed off today, so the payment settles tomorrow.
SIGNED_OFF_TODAY = sa.exists(sa.select(T_LINK.c.bank_id).where(
    T_LINK.c.bank_id == _b("bank_id"), T_LINK.c.state == SIGNED_OFF, T_LINK.c.business_date >= _b("day")))


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=dt.UTC))


def _view(row: Any) -> LinkView:
    return LinkView(row.bank_id, row.state or OPEN, row.business_date, _aware(row.changed_at),
                    row.refund_mode or PREPAID, bool(row.suspended))


def read_link(conn: Connection, bank_id: str) -> LinkView:
    row = conn.execute(_READ, {"bank_id": bank_id}).first()
    if row is None:
        raise Forbidden(f"bank {bank_id} has no agreement with the utility", reason="UNKNOWN_BANK")
    return _view(row)


def link_states(engine: Engine) -> list[LinkView]:
    """Every known bank's link state (metrics, the operator's list)."""
    with engine.connect() as conn:
        return [_view(r) for r in conn.execute(_ALL)]


def _insert_ignore(conn: Connection, values: dict[str, object]) -> None:
    name = conn.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        conn.execute(pg_insert(T_LINK).values(**values).on_conflict_do_nothing())
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        conn.execute(sqlite_insert(T_LINK).values(**values).on_conflict_do_nothing())
    else:
        conn.execute(T_LINK.insert().prefix_with("IGNORE").values(**values))


def _ensure_row(conn: Connection, bank_id: str, today: dt.date, now: dt.datetime) -> None:
    """The bank's row exists (OPEN when new) and is locked until the caller's transaction ends."""
    read_link(conn, bank_id)  # an unknown bank is refused before anything is written
    if conn.execute(_LOCK_ROW, {"bank_id": bank_id}).first() is None:
        _insert_ignore(conn, {"bank_id": bank_id, "state": OPEN, "business_date": today, "changed_at": now,
                              "refund_mode": PREPAID})
        conn.execute(_LOCK_ROW, {"bank_id": bank_id}).first()


def _set_state(engine: Engine, bank_id: str, state: str, rpc: str, today: dt.date, now: dt.datetime) -> LinkView:
    with engine.begin() as conn:
        _ensure_row(conn, bank_id, today, now)
        conn.execute(_SET_STATE, {"p_bank": bank_id, "p_state": state, "p_day": today, "p_at": now})
        conn.execute(T_JOURNAL.insert().values(at=now, bank_id=bank_id, rpc=rpc, serial="", original_serial="",
                                               account_no="", amount_fen=0, outcome=state, payment_id=None))
        return read_link(conn, bank_id)


def mirror(engine: Engine, v: LinkView) -> None:
    """With branch databases: the branch database's copy of the bank's link state and refund mode,
    written after the primary's (which stays the truth, and is what Echo and SignOn answer from). A
    branch's pays and feed results read it in their own transaction (SIGNED_OFF_TODAY, refund_mode),
    exactly as with one database: a REFUND bank's over-debit in a branch is offered there, and
    ListRefunds / AcknowledgeRefunds serve every database (mis_adapter.refunds). No bank check and
    no journal line here: the primary's transaction made both."""
    with engine.begin() as conn:
        if conn.execute(_LOCK_ROW, {"bank_id": v.bank_id}).first() is None:
            _insert_ignore(conn, {"bank_id": v.bank_id, "state": v.state, "business_date": v.business_date,
                                  "changed_at": v.changed_at, "refund_mode": v.refund_mode})
            conn.execute(_LOCK_ROW, {"bank_id": v.bank_id}).first()
        conn.execute(_SET_STATE, {"p_bank": v.bank_id, "p_state": v.state, "p_day": v.business_date,
                                  "p_at": v.changed_at})
        conn.execute(_SET_MODE, {"p_bank": v.bank_id, "p_mode": v.refund_mode})


def sign_on(engine: Engine, bank_id: str, today: dt.date, now: dt.datetime) -> LinkView:
    return _set_state(engine, bank_id, SIGNED_ON, "SIGN_ON", today, now)


def sign_off(engine: Engine, bank_id: str, today: dt.date, now: dt.datetime) -> LinkView:
    return _set_state(engine, bank_id, SIGNED_OFF, "SIGN_OFF", today, now)


def set_refund_mode(engine: Engine, bank_id: str, mode: str, today: dt.date, now: dt.datetime) -> LinkView:
    """Operator configuration: PREPAID keeps over-debits as prepaid credit, REFUND offers them back."""
    if mode not in REFUND_MODES:
        raise InvalidField("refund_mode", "must be PREPAID or REFUND")
    with engine.begin() as conn:
        _ensure_row(conn, bank_id, today, now)
        conn.execute(_SET_MODE, {"p_bank": bank_id, "p_mode": mode})
        return read_link(conn, bank_id)


def refund_mode(conn: Connection, bank_id: str) -> str:
    row = conn.execute(sa.select(T_LINK.c.refund_mode).where(T_LINK.c.bank_id == bank_id)).first()
    return PREPAID if row is None else str(row.refund_mode)


def signed_off_on(conn: Connection, bank_id: str, today: dt.date) -> bool:
    """Whether the bank signed off `today` (or later): its pays now settle tomorrow
    (mis_adapter.banks.settlement_day, allocation.settlement_date)."""
    row = conn.execute(_OFF, {"bank_id": bank_id}).first()
    return row is not None and signed_off_for(row.state, row.business_date, today)
