"""The utility's side of continuous reconciliation (yindian_common.control_totals):
the control totals of one bank's settlement date read from the MIS, and a
bounded page of its per-serial entries.

What counts is what the bridge journals: pays through Pay (and their
reversals), posted before the bridge's cutoff. Payments posted by the bill
feed (the bank's debit results: the bridge does not journal them) and by
reconciliation (BANK_ONLY) are left out, and so are the serials the bridge
says are in doubt. Read-only, one short transaction per MIS database; it
never writes."""
from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mis_adapter.db.base import table_of
from mis_adapter.db.core import Payment
from mis_adapter.db.feed import DebitResultRow
from mis_adapter.db.recon import ReconciledDay
from mis_adapter.recon_outcomes import RECON_CHANNEL
from mis_adapter.routing import BranchRouter
from yindian_common.control_totals import ControlTotals, Entry

__all__ = ["ControlQuery", "ControlView", "control_view"]

T_PAY = table_of(Payment)
T_RES = table_of(DebitResultRow)
T_RECON = table_of(ReconciledDay)
POSTED, REVERSED = "POSTED", "REVERSED"


@dataclass(frozen=True)
class ControlQuery:
    bank_id: str
    settlement_date: dt.date
    posted_before: dt.datetime  # UTC
    in_doubt: frozenset[str]
    list_max: int = 0
    list_after: str = ""


@dataclass(frozen=True)
class ControlView:
    totals: ControlTotals
    reconciled: bool
    entries: list[tuple[str, Entry]]
    next_after: str  # '' when the listing is complete


def _counted(q: ControlQuery) -> list[sa.ColumnElement[bool]]:
    p = T_PAY.c
    from_feed = sa.exists().where(T_RES.c.bank_id == p.bank_id, T_RES.c.bank_serial == p.bank_serial)
    return [p.bank_id == q.bank_id, p.settlement_date == q.settlement_date, p.state.in_((POSTED, REVERSED)),
            p.posted_at < q.posted_before, p.channel != RECON_CHANNEL, ~from_feed]


def _reversed_by_cutoff(q: ControlQuery) -> sa.ColumnElement[int]:
    """1 when the pay was reversed before the cutoff: a reversal after it still counts as posted (the state
    as of the cutoff), so that a cancel answered between the two sides' reads is counted alike."""
    p = T_PAY.c
    return sa.case((sa.and_(p.state == REVERSED, p.reversed_at < q.posted_before), 1), else_=0)


def _totals(conn: Connection, q: ControlQuery) -> ControlTotals:
    p = T_PAY.c
    is_reversed = _reversed_by_cutoff(q).label("is_reversed")
    by_state = {int(rev): (int(n), int(fen or 0)) for rev, n, fen in conn.execute(
        sa.select(is_reversed, sa.func.count(), sa.func.sum(p.amount_fen)).where(*_counted(q))
        .group_by(is_reversed))}
    if q.in_doubt:  # subtracted rather than excluded in SQL: the aggregate keeps its plain index range
        for rev, amount_fen in conn.execute(sa.select(is_reversed, p.amount_fen).where(
                *_counted(q), p.bank_serial.in_(sorted(q.in_doubt)))):
            n, fen = by_state[int(rev)]
            by_state[int(rev)] = (n - 1, fen - int(amount_fen))
    posted, reversed_ = by_state.get(0, (0, 0)), by_state.get(1, (0, 0))
    return ControlTotals(posted[0], posted[1], reversed_[0], reversed_[1])


def _entries(conn: Connection, q: ControlQuery, in_doubt: Collection[str]) -> list[tuple[str, Entry]]:
    p = T_PAY.c
    rows = conn.execute(sa.select(p.bank_serial, p.amount_fen, _reversed_by_cutoff(q)).where(
        *_counted(q), p.bank_serial > q.list_after).order_by(p.bank_serial).limit(q.list_max + 1 + len(in_doubt)))
    return [(s, Entry(int(fen), bool(rev))) for s, fen, rev in rows if s not in in_doubt]


def control_view(router: BranchRouter, q: ControlQuery) -> ControlView:
    """The MIS's totals for `q` over every MIS database, and a page of entries when `q.list_max` > 0."""
    totals = ControlTotals()
    reconciled = False
    entries: list[tuple[str, Entry]] = []
    for engine in router.engines():
        with engine.connect().execution_options(read_only=True) as conn, conn.begin():
            t = _totals(conn, q)
            totals = ControlTotals(totals.posted_count + t.posted_count, totals.posted_fen + t.posted_fen,
                                   totals.reversed_count + t.reversed_count, totals.reversed_fen + t.reversed_fen)
            reconciled = reconciled or conn.execute(sa.select(T_RECON.c.bank_id).where(
                T_RECON.c.bank_id == q.bank_id, T_RECON.c.settlement_date == q.settlement_date)).first() is not None
            if q.list_max > 0:
                entries.extend(_entries(conn, q, q.in_doubt))
    entries.sort(key=lambda e: e[0])
    page = entries[:q.list_max] if q.list_max > 0 else []
    next_after = page[-1][0] if q.list_max > 0 and len(entries) > q.list_max else ""
    return ControlView(totals, reconciled, page, next_after)
