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

With branch databases (`--branch-db`) each database offers the refunds of its
own over-debits (the refund mode is mirrored to it like the link state,
mis_adapter.link_state.mirror). Refund ids are per database, so on the wire
(and only with several MIS databases) a refund id is `local id * 100 + N`,
N being 0 for the primary database and the branch code (01-99) for a branch
database (the lowest code it serves): stable across restarts and the order
of the `--branch-db` flags; branch code 00 cannot have a database of its
own. With one database wire ids are the database's ids, as always.
ListRefunds merges every database's open refunds (offered_at, then id);
AcknowledgeRefunds routes each id to its database, and an id of no database
is answered like one never offered.

A bank configured PREPAID (the default) keeps every over-debit as the
account's prepaid credit, as before; its `feed_refunds` rows are only a list.
The first half is pure; the second is storage (SQLAlchemy Core)."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
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
    "REFUND_ID_DATABASES", "RefundDatabase", "databases_of", "list_open_across", "acknowledge_across",
]

OFFERED, ACKNOWLEDGED = "OFFERED", "ACKNOWLEDGED"
ACK_BATCH_MAX = 500       # acknowledgements per call
LIST_PAGE_MAX = 500       # refunds per ListRefunds answer
LIST_PAGE_DEFAULT = 100
REFUND_ID_DATABASES = 100  # with branch databases: wire refund id = local id * 100 + database number
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


# ---- several databases (branch databases, mis_adapter.routing) ----

@dataclass(frozen=True)
class RefundDatabase:
    """A MIS database refunds are offered from. `number` is None for the only database (wire
    refund ids are its own ids, as they always were); with branch databases it is 0 for the
    primary and int(code) for a branch database, code being the lowest branch code it serves."""
    number: int | None
    engine: Engine

    def wire_id(self, local_id: int) -> int:
        return local_id if self.number is None else local_id * REFUND_ID_DATABASES + self.number


def databases_of(keys: Sequence[tuple[str, Engine]], order: Sequence[Engine]) -> list[RefundDatabase]:
    """The router's databases (`database_keys`: '' for the primary, else the lowest branch code it
    serves), in `order` (the router's engines(), the order reconciliation locks them in)."""
    if len(keys) == 1:
        return [RefundDatabase(None, keys[0][1])]
    number = {engine: int(key) if key else 0 for key, engine in keys}
    if any(key == "00" for key, _ in keys):
        raise ValueError("branch code 00 cannot have a database of its own: refund ids ending in 00 "
                         "are the primary database's")
    return [RefundDatabase(number[e], e) for e in order]


def _route(dbs: Sequence[RefundDatabase], wire_id: int) -> tuple[int, int] | None:
    """(index in dbs, local refund id) of a wire refund id, None when no database has that number."""
    if len(dbs) == 1 and dbs[0].number is None:
        return 0, wire_id
    local_id, number = divmod(wire_id, REFUND_ID_DATABASES)
    for i, d in enumerate(dbs):
        if d.number == number and local_id > 0:
            return i, local_id
    return None


def list_open_across(dbs: Sequence[RefundDatabase], bank_id: str, page_size: int) -> list[RefundView]:
    """The bank's OFFERED refunds of every database with wire ids, oldest first (offered_at, then id),
    at most one page: each database answers at most a page, the merge keeps the oldest page."""
    limit = list_size_of(page_size)
    views = [replace(v, refund_id=d.wire_id(v.refund_id)) for d in dbs for v in list_open(d.engine, bank_id, limit)]
    return sorted(views, key=lambda v: (v.offered_at, v.refund_id))[:limit]


def acknowledge(engine: Engine, bank_id: str, acks: Sequence[RefundAckIn], today: dt.date,
                now: dt.datetime) -> AckResult:
    """Records the bank's credits of offered refunds (AcknowledgeRefunds), all or nothing."""
    return acknowledge_across([RefundDatabase(None, engine)], bank_id, acks, today, now)


def acknowledge_across(dbs: Sequence[RefundDatabase], bank_id: str, acks: Sequence[RefundAckIn],
                       today: dt.date, now: dt.datetime) -> AckResult:
    """AcknowledgeRefunds over `dbs`: each wire id goes to its database. Every database's transaction
    is open, its bank-day lock held (in `dbs` order, as reconciliation takes them) and the whole batch
    checked, credit serials across all databases, before any is written. Only a database lost
    between the commits leaves part of a batch acknowledged: the bank's retry replays that part."""
    validate_acks(acks)
    routed: list[list[tuple[int, int, RefundAckIn]]] = [[] for _ in dbs]
    for i, a in enumerate(acks):
        where = _route(dbs, a.refund_id)
        if where is None:
            raise InvalidField(f"acks[{i}].refund_id", f"{a.refund_id} was not offered to this bank")
        routed[where[0]].append((i, where[1], a))
    with ExitStack() as stack:
        conns = [stack.enter_context(d.engine.begin()) for d in dbs]
        for conn in conns:
            # Bank-day lock first (as payments take it), so reconciliation sees each refund in one day.
            lock_bank_day(conn, bank_id)
        serials = [a.credit_serial for a in acks]
        used = {r.credit_serial: (k, int(r.refund_id)) for k, conn in enumerate(conns)
                for r in conn.execute(_SERIALS_USED, {"bank_id": bank_id, "serials": serials})}
        fresh: list[list[tuple[int, RefundAckIn, Any]]] = [[] for _ in dbs]
        replayed = 0
        for k, (conn, items) in enumerate(zip(conns, routed, strict=True)):
            if not items:
                continue
            offers = {int(r.refund_id): r for r in conn.execute(
                _LOCK_OFFERS, {"bank_id": bank_id, "ids": sorted(local for _i, local, _a in items)})}
            for i, local, a in items:
                offer = offers.get(local)
                if offer is None:
                    raise InvalidField(f"acks[{i}].refund_id", f"{a.refund_id} was not offered to this bank")
                if a.amount_fen != offer.amount_fen:
                    raise InvalidField(f"acks[{i}].amount_fen", f"{a.amount_fen} is not the refund's "
                                                                f"{offer.amount_fen} fen")
                if used.get(a.credit_serial, (k, local)) != (k, local):
                    raise SerialConflict(f"acks[{i}].credit_serial {a.credit_serial} acknowledged another refund",
                                         field=f"acks[{i}].credit_serial")
                if offer.state == ACKNOWLEDGED:
                    if offer.credit_serial != a.credit_serial:
                        raise SerialConflict(f"acks[{i}]: refund {a.refund_id} was acknowledged with another "
                                             "credit serial", field=f"acks[{i}].credit_serial",
                                             reason="REFUND_ALREADY_ACKNOWLEDGED")
                    replayed += 1
                    continue
                fresh[k].append((local, a, offer))
        days = [_write_acks(conn, bank_id, items, today, now) for conn, items in zip(conns, fresh, strict=True)
                if items]
        if not days:
            return AckResult(0, replayed, None, 0)
        done = [a for items in fresh for _local, a, _offer in items]
        return AckResult(len(done), replayed, max(days), sum(a.amount_fen for a in done))


def _write_acks(conn: Connection, bank_id: str, items: Sequence[tuple[int, RefundAckIn, Any]], today: dt.date,
                now: dt.datetime) -> dt.date:
    """Acknowledges checked refunds of one database; returns their settlement date there."""
    day = settlement_day(conn, bank_id, today)
    for local, a, _offer in items:
        if conn.execute(_ACK, {"p_id": local, "p_serial": a.credit_serial, "p_at": now,
                               "p_day": day}).rowcount != 1:
            raise RuntimeError(f"refund {a.refund_id} changed under its row lock")
    conn.execute(T_JOURNAL.insert(), [
        {"at": now, "bank_id": bank_id, "rpc": "REFUND_ACK", "serial": a.credit_serial, "original_serial":
         offer.original_serial, "account_no": offer.account_no, "amount_fen": a.amount_fen,
         "outcome": ACKNOWLEDGED, "payment_id": None} for _local, a, offer in items])
    return day


def day_totals(conn: Connection, bank_id: str, day: dt.date) -> tuple[int, int]:
    """(count, fen) of the refunds acknowledged with settlement date `day`: netted in its settlement."""
    count, fen = conn.execute(_DAY_TOTALS, {"bank_id": bank_id, "day": day}).one()
    return int(count), int(fen)
