"""Refunds to the bank: a DEBITED feed result that met a bill already settled
by another channel is listed in `feed_refunds` (mis_adapter.feed). A bank
configured for refunds (`bank_links.refund_mode` REFUND; operator command
`python -m mis_adapter bank refund-mode BANK refund`) gets it back:

- offered in the same transaction that lists it: the amount leaves the
  account's prepaid credit (ledger `REFUND_OFFERED`) and an OFFERED row is
  written (`refund_offers`). Only credit still there is offered: if issuance
  applied part of it to a new bill meanwhile, the rest is offered.
- `ListRefunds` answers the bank's OFFERED refunds, oldest first; they stay
  listed until acknowledged, so a bank that died before acknowledging sees
  them again and must recognise the ones it credited already (by refund_id).
- `AcknowledgeRefunds` records that the bank credited the savings account,
  with the bank's credit serial: idempotent per refund_id (the same serial
  again is a replay, another serial ALREADY_EXISTS); a refund never offered
  to this bank is INVALID_ARGUMENT naming `acks[i].refund_id`, exactly as an
  absent one; the whole batch is checked before anything is written. The
  refund counts, as money the utility pays back, in the net settlement of
  the bank's settlement date at acknowledgement (the payment rule: the next
  day after a sign-off or once today is reconciled).

A bank configured PREPAID (the default) keeps every over-debit as the
account's prepaid credit, as before; its `feed_refunds` rows are only a list.
The first half is pure; the second is storage (SQLAlchemy Core)."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mis_adapter import link_state
from mis_adapter.banks import lock_bank_day, settlement_day
from mis_adapter.db.base import table_of
from mis_adapter.db.core import Customer, JournalEntry, PrepaidEntry
from mis_adapter.db.feed import RefundRow
from mis_adapter.db.link import AgreementRecord, RefundOffer
from yindian_common import fields
from yindian_common.errors import InvalidField, SerialConflict

__all__ = [
    "OFFERED", "ACKNOWLEDGED", "ACK_BATCH_MAX", "LIST_PAGE_MAX", "LIST_PAGE_DEFAULT", "RefundView", "RefundAckIn",
    "AckResult", "validate_acks", "offer_in_tx", "list_open", "acknowledge", "day_totals",
]

OFFERED, ACKNOWLEDGED = "OFFERED", "ACKNOWLEDGED"
ACK_BATCH_MAX = 500       # acknowledgements per call
LIST_PAGE_MAX = 500       # refunds per ListRefunds answer
LIST_PAGE_DEFAULT = 100
LEDGER_REASON = "REFUND_OFFERED"


@dataclass(frozen=True)
class RefundView:
    refund_id: int
    account_no: str
    original_serial: str
    bill_id: int
    amount_fen: int
    savings_account_ref: str
    offered_at: dt.datetime


@dataclass(frozen=True)
class RefundAckIn:
    refund_id: int
    credit_serial: str
    amount_fen: int


@dataclass(frozen=True)
class AckResult:
    acknowledged: int
    replayed: int
    settlement_date: dt.date | None
    acknowledged_fen: int


# ---- pure ----

def list_size_of(requested: int) -> int:
    if requested == 0:
        return LIST_PAGE_DEFAULT
    if not 1 <= requested <= LIST_PAGE_MAX:
        raise InvalidField("page_size", f"must be between 1 and {LIST_PAGE_MAX} (0: {LIST_PAGE_DEFAULT})")
    return requested


def validate_acks(acks: Sequence[RefundAckIn]) -> None:
    """Field rules of a batch of acknowledgements; InvalidField names `acks[i].<field>`."""
    if not acks:
        raise InvalidField("acks", "at least one acknowledgement is required")
    if len(acks) > ACK_BATCH_MAX:
        raise InvalidField("acks", f"at most {ACK_BATCH_MAX} acknowledgements per call")
    ids: set[int] = set()
    serials: set[str] = set()
    for i, a in enumerate(acks):
        if a.refund_id <= 0:
            raise InvalidField(f"acks[{i}].refund_id", "must be positive")
        if a.refund_id in ids:
            raise InvalidField(f"acks[{i}].refund_id", "appears twice in this call")
        fields.serial(a.credit_serial, f"acks[{i}].credit_serial")
        if a.credit_serial in serials:
            raise InvalidField(f"acks[{i}].credit_serial", "appears twice in this call")
        fields.amount_fen(a.amount_fen, f"acks[{i}].amount_fen")
        ids.add(a.refund_id)
        serials.add(a.credit_serial)


# ---- storage ----

T_OFFER = table_of(RefundOffer)
T_REF = table_of(RefundRow)
T_CUST = table_of(Customer)
T_PREPAID = table_of(PrepaidEntry)
T_JOURNAL = table_of(JournalEntry)
T_REC = table_of(AgreementRecord)
_b = sa.bindparam

_LISTED_NOT_OFFERED = (sa.select(T_REF.c.refund_id, T_REF.c.account_no, T_REF.c.bill_id, T_REF.c.bank_serial,
                                 T_REF.c.amount_fen)
                       .where(T_REF.c.bank_id == _b("bank_id"), T_REF.c.seq.in_(_b("seqs", expanding=True)),
                              ~sa.exists().where(T_OFFER.c.refund_id == T_REF.c.refund_id))
                       .order_by(T_REF.c.refund_id))
_PREPAID_OF = sa.select(T_CUST.c.prepaid_fen).where(T_CUST.c.account_no == _b("acct")).with_for_update()
_TAKE_PREPAID = (T_CUST.update().where(T_CUST.c.account_no == _b("p_acct"))
                 .values(prepaid_fen=T_CUST.c.prepaid_fen - _b("p_take")))
_SAVINGS_REF = (sa.select(T_REC.c.savings_account_ref)
                .where(T_REC.c.bank_id == _b("bank_id"), T_REC.c.account_no == _b("acct"))
                .order_by(T_REC.c.agreement_id.desc()).limit(1))
_OPEN = (sa.select(T_OFFER).where(T_OFFER.c.bank_id == _b("bank_id"), T_OFFER.c.state == OFFERED)
         .order_by(T_OFFER.c.refund_id).limit(_b("limit")))
_LOCK_OFFERS = (sa.select(T_OFFER).where(T_OFFER.c.bank_id == _b("bank_id"),
                                         T_OFFER.c.refund_id.in_(_b("ids", expanding=True)))
                .order_by(T_OFFER.c.refund_id).with_for_update())
_SERIALS_USED = sa.select(T_OFFER.c.refund_id, T_OFFER.c.credit_serial).where(
    T_OFFER.c.bank_id == _b("bank_id"), T_OFFER.c.credit_serial.in_(_b("serials", expanding=True)))
_ACK = (T_OFFER.update().where(T_OFFER.c.refund_id == _b("p_id"), T_OFFER.c.state == OFFERED)
        .values(state=ACKNOWLEDGED, credit_serial=_b("p_serial"), acknowledged_at=_b("p_at"),
                settlement_date=_b("p_day")))
_DAY_TOTALS = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(T_OFFER.c.amount_fen), 0)).where(
    T_OFFER.c.bank_id == _b("bank_id"), T_OFFER.c.settlement_date == _b("day"), T_OFFER.c.state == ACKNOWLEDGED)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def offer_in_tx(conn: Connection, bank_id: str, seqs: Sequence[int], now: dt.datetime) -> int:
    """In the transaction that listed the refunds of feed `seqs`: offers them
    back when the bank is configured REFUND. Returns how many were offered."""
    if not seqs or link_state.refund_mode(conn, bank_id) != link_state.REFUND:
        return 0
    offered = 0
    for r in conn.execute(_LISTED_NOT_OFFERED, {"bank_id": bank_id, "seqs": sorted(set(seqs))}).all():
        prepaid = int(conn.execute(_PREPAID_OF, {"acct": r.account_no}).scalar_one())
        take = min(int(r.amount_fen), prepaid)
        if take <= 0:
            continue  # the credit was applied to a bill meanwhile: nothing left to give back
        conn.execute(_TAKE_PREPAID, {"p_acct": r.account_no, "p_take": take})
        conn.execute(T_PREPAID.insert().values(account_no=r.account_no, reason=LEDGER_REASON, delta_fen=-take,
                                               balance_after_fen=prepaid - take, payment_id=None,
                                               bill_id=r.bill_id, at=now))
        ref = conn.execute(_SAVINGS_REF, {"bank_id": bank_id, "acct": r.account_no}).scalar_one_or_none() or ""
        conn.execute(T_OFFER.insert().values(refund_id=r.refund_id, bank_id=bank_id, account_no=r.account_no,
                                             bill_id=r.bill_id, original_serial=r.bank_serial, amount_fen=take,
                                             savings_account_ref=ref, state=OFFERED, offered_at=now,
                                             credit_serial=None, acknowledged_at=None, settlement_date=None))
        offered += 1
    return offered


def _view(row: Any) -> RefundView:
    return RefundView(int(row.refund_id), row.account_no, row.original_serial, int(row.bill_id),
                      int(row.amount_fen), row.savings_account_ref, _aware(row.offered_at))


def list_open(engine: Engine, bank_id: str, page_size: int) -> list[RefundView]:
    limit = list_size_of(page_size)
    with engine.connect() as conn:
        return [_view(r) for r in conn.execute(_OPEN, {"bank_id": bank_id, "limit": limit})]


def acknowledge(engine: Engine, bank_id: str, acks: Sequence[RefundAckIn], today: dt.date,
                now: dt.datetime) -> AckResult:
    """Records the bank's credits of offered refunds (AcknowledgeRefunds), all or nothing."""
    validate_acks(acks)
    with engine.begin() as conn:
        # Bank-day lock first (as payments take it), so reconciliation sees each refund in one day.
        lock_bank_day(conn, bank_id)
        offers = {int(r.refund_id): r for r in conn.execute(
            _LOCK_OFFERS, {"bank_id": bank_id, "ids": sorted(a.refund_id for a in acks)})}
        used = {r.credit_serial: int(r.refund_id) for r in conn.execute(
            _SERIALS_USED, {"bank_id": bank_id, "serials": [a.credit_serial for a in acks]})}
        fresh: list[RefundAckIn] = []
        replayed = 0
        for i, a in enumerate(acks):
            offer = offers.get(a.refund_id)
            if offer is None:
                raise InvalidField(f"acks[{i}].refund_id", f"{a.refund_id} was not offered to this bank")
            if a.amount_fen != offer.amount_fen:
                raise InvalidField(f"acks[{i}].amount_fen", f"{a.amount_fen} is not the refund's "
                                                            f"{offer.amount_fen} fen")
            if used.get(a.credit_serial, a.refund_id) != a.refund_id:
                raise SerialConflict(f"acks[{i}].credit_serial {a.credit_serial} acknowledged another refund",
                                     field=f"acks[{i}].credit_serial")
            if offer.state == ACKNOWLEDGED:
                if offer.credit_serial != a.credit_serial:
                    raise SerialConflict(f"acks[{i}]: refund {a.refund_id} was acknowledged with another "
                                         "credit serial", field=f"acks[{i}].credit_serial",
                                         reason="REFUND_ALREADY_ACKNOWLEDGED")
                replayed += 1
                continue
            fresh.append(a)
        if not fresh:
            return AckResult(0, replayed, None, 0)
        day = settlement_day(conn, bank_id, today)
        for a in fresh:
            if conn.execute(_ACK, {"p_id": a.refund_id, "p_serial": a.credit_serial, "p_at": now,
                                   "p_day": day}).rowcount != 1:
                raise RuntimeError(f"refund {a.refund_id} changed under its row lock")
        conn.execute(T_JOURNAL.insert(), [
            {"at": now, "bank_id": bank_id, "rpc": "REFUND_ACK", "serial": a.credit_serial, "original_serial":
             offers[a.refund_id].original_serial, "account_no": offers[a.refund_id].account_no,
             "amount_fen": a.amount_fen, "outcome": ACKNOWLEDGED, "payment_id": None} for a in fresh])
        return AckResult(len(fresh), replayed, day, sum(a.amount_fen for a in fresh))


def day_totals(conn: Connection, bank_id: str, day: dt.date) -> tuple[int, int]:
    """(count, fen) of the refunds acknowledged with settlement date `day`: netted in its settlement."""
    count, fen = conn.execute(_DAY_TOTALS, {"bank_id": bank_id, "day": day}).one()
    return int(count), int(fen)
