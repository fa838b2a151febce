"""The wire edge of ExchangeControlTotals in mis_adapter (continuous
reconciliation; the rules in yindian_common.control_totals). The bank comes
from the link, never from the body. Validates the request, reads the MIS's
totals (mis_adapter.control_totals), compares them with the bridge's, keeps
the per-bank persistence state, sets `yindian_control_total_divergence_fen`
and logs a flagged divergence once. Read-only: it never writes a row."""
from __future__ import annotations

import datetime as dt
import logging

import grpc

from mis_adapter.context import AdapterContext
from mis_adapter.control_totals import ControlQuery, ControlView, control_view
from yindian.v1 import billing_pb2 as pb
from yindian_common import business_metrics, fields
from yindian_common.clock import utc_now
from yindian_common.control_totals import AGREE, ControlTotals, DivergenceTracker, Verdict, divergence
from yindian_common.db import watched_until_deadline
from yindian_common.errors import InvalidField
from yindian_common.identity import bank_of
from yindian_common.status import guard

log = logging.getLogger("mis_adapter.control_totals")

DIFFERING_SERIALS_MAX = 10
COUNT_MAX = 10**12
FEN_MAX = 10**18


def totals_from_proto(t: pb.ControlTotals, field: str) -> ControlTotals:
    for name in ("posted_count", "reversed_count"):
        if not 0 <= getattr(t, name) <= COUNT_MAX:
            raise InvalidField(f"{field}.{name}", f"must be between 0 and {COUNT_MAX}")
    for name in ("posted_fen", "reversed_fen"):
        if not 0 <= getattr(t, name) <= FEN_MAX:
            raise InvalidField(f"{field}.{name}", f"must be between 0 and {FEN_MAX}")
    return ControlTotals(t.posted_count, t.posted_fen, t.reversed_count, t.reversed_fen)


def totals_to_proto(t: ControlTotals) -> pb.ControlTotals:
    return pb.ControlTotals(posted_count=t.posted_count, posted_fen=t.posted_fen, reversed_count=t.reversed_count,
                            reversed_fen=t.reversed_fen)


def query_of(bank_id: str, req: pb.ExchangeControlTotalsRequest, *, in_doubt_max: int,
             list_max: int) -> ControlQuery:
    day = fields.iso_date(req.settlement_date, "settlement_date")
    if len(req.in_doubt_serials) > in_doubt_max:
        raise InvalidField("in_doubt_serials", f"at most {in_doubt_max} serials")
    for s in req.in_doubt_serials:
        fields.serial(s, "in_doubt_serials")
    if len(req.differing_serials) > DIFFERING_SERIALS_MAX:
        raise InvalidField("differing_serials", f"at most {DIFFERING_SERIALS_MAX} serials")
    for s in req.differing_serials:
        fields.serial(s, "differing_serials")
    if not 0 <= req.list_max <= list_max:
        raise InvalidField("list_max", f"must be between 0 and {list_max}")
    if req.list_after_serial:
        fields.serial(req.list_after_serial, "list_after_serial")
    if not req.HasField("posted_before"):
        raise InvalidField("posted_before", "is required")
    try:
        cutoff = req.posted_before.ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        raise InvalidField("posted_before", "is not a valid instant") from None
    return ControlQuery(bank_id, day, cutoff, frozenset(req.in_doubt_serials), req.list_max, req.list_after_serial)


class ControlTotalsDesk:
    """ExchangeControlTotals for one mis_adapter process: the persistence state of every bank's divergence."""

    def __init__(self, ctx: AdapterContext) -> None:
        self.ctx = ctx
        self.tracker = DivergenceTracker(ctx.settings.control_totals_window_s)

    def exchange(self, request: pb.ExchangeControlTotalsRequest, context: grpc.ServicerContext
                 ) -> pb.ExchangeControlTotalsResponse:
        settings = self.ctx.settings
        with guard(context, "ExchangeControlTotals"), watched_until_deadline(context.time_remaining()):
            bank_id = bank_of(context, tls=self.ctx.tls)
            self.ctx.banks.ensure_known(bank_id)
            q = query_of(bank_id, request, in_doubt_max=settings.control_totals_in_doubt_max,
                         list_max=settings.control_totals_list_max)
            theirs = totals_from_proto(request.totals, "totals")
            view = control_view(self.ctx.router, q)
            self._observe(q, theirs, view, list(request.differing_serials))
            return pb.ExchangeControlTotalsResponse(
                settlement_date=q.settlement_date.isoformat(), totals=totals_to_proto(view.totals),
                reconciled=view.reconciled,
                entries=[pb.ControlEntry(bank_serial=s, amount_fen=e.amount_fen, reversed=e.reversed)
                         for s, e in view.entries],
                next_after_serial=view.next_after)

    def _observe(self, q: ControlQuery, bridge: ControlTotals, view: ControlView, differing: list[str]) -> None:
        now = utc_now(self.ctx.clock)
        if view.reconciled:
            verdict = self.tracker.settle(q.bank_id, q.settlement_date, now)
            business_metrics.record_control_exchange(q.bank_id, "RECONCILED")
        else:
            verdict = self.tracker.observe(q.bank_id, q.settlement_date, divergence(view.totals, bridge), now)
            business_metrics.record_control_exchange(q.bank_id, verdict.state)
        business_metrics.set_control_divergence(q.bank_id, verdict.gauge_fen, verdict.gauge_count)
        _log_verdict(q, verdict, bridge, view.totals, differing)


def _log_verdict(q: ControlQuery, verdict: Verdict, bridge: ControlTotals, mis: ControlTotals,
                 differing: list[str]) -> None:
    if verdict.newly_flagged:
        log.error("event=control_totals_diverged bank=%s settlement_date=%s divergence_fen=%d divergence_count=%d "
                  "persisted_s=%.1f mis=%s bridge=%s", q.bank_id, q.settlement_date, verdict.divergence.fen,
                  verdict.divergence.count, verdict.persisted_s, _fmt(mis), _fmt(bridge))
    if differing and verdict.state != AGREE:
        log.error("event=control_totals_differing_serials bank=%s settlement_date=%s serials=%s", q.bank_id,
                  q.settlement_date, ",".join(differing))
    if verdict.cleared:
        log.warning("event=control_totals_agree_again bank=%s settlement_date=%s", q.bank_id, q.settlement_date)


def _fmt(t: ControlTotals) -> str:
    return f"{t.posted_count}/{t.posted_fen}fen+{t.reversed_count}/{t.reversed_fen}fen_reversed"
