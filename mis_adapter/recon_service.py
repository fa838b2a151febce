"""The wire edge of BillingService.Reconcile on mis_adapter: reads the bank's
stream (header, record batches, optional trailer), converts and validates it,
hands it to recon.Reconciliation, and streams back the discrepancy lines in
batches, then the summary. A day already reconciled answers at once with its
stored lines and summary (`replayed`), whatever records follow.

Errors: a malformed stream or record is INVALID_ARGUMENT naming the field and
the record (records[<n>], n counted from 1 over the whole stream); nothing is
applied. A bank silent for `recon_peer_silence_s` between two messages
(holding its staging connection, on PostgreSQL an open COPY) ends the
stream DEADLINE_EXCEEDED RECON_PEER_SILENT, nothing applied: the messages are
received on a thread into a small queue (yindian_common.handoff.received), so
the wait is bounded; the close after the last message is not. On a dead
database link the stream's round trips are given up by the caller's deadline
(db_watch): UNAVAILABLE naming the database, the thread free. Nothing here
knows the matching rule."""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from mis_adapter import recon, recon_branches
from mis_adapter.context import AdapterContext
from mis_adapter.recon import Discrepancy, ReconSummary
from yindian.v1 import billing_pb2 as pb
from yindian_common import business_metrics as bm
from yindian_common import db_watch, fields
from yindian_common.clock import business_date
from yindian_common.db import deadline_due
from yindian_common.errors import Aborted, InvalidField, ReconPeerSilent, YinDianError
from yindian_common.handoff import received
from yindian_common.status import guard
from yindian_common.stream_end import ended_by_peer

log = logging.getLogger("mis_adapter.recon")

# Messages received from the bank and waiting to be loaded: a few batches, so that receiving overlaps
# loading while memory stays bounded (the bank is held back by flow control beyond).
RECEIVE_QUEUE_MAX = 4

BANK_STATUS = {pb.BANK_RECORD_STATUS_POSTED: recon.BANK_POSTED, pb.BANK_RECORD_STATUS_CANCELLED: recon.BANK_CANCELLED}
BANK_STATUS_PB = {v: k for k, v in BANK_STATUS.items()}
OUTCOME_PB = {recon.MATCHED: pb.RECONCILE_OUTCOME_MATCHED, recon.BANK_ONLY: pb.RECONCILE_OUTCOME_BANK_ONLY,
              recon.UTILITY_ONLY: pb.RECONCILE_OUTCOME_UTILITY_ONLY, recon.MISMATCH: pb.RECONCILE_OUTCOME_MISMATCH}
MIS_STATE_PB = {"POSTED": pb.PAYMENT_STATE_POSTED, "REVERSED": pb.PAYMENT_STATE_REVERSED,
                "TOMBSTONE": pb.PAYMENT_STATE_REFUSED, "": pb.PAYMENT_STATE_NOT_FOUND}


# ---- domain -> proto ----
def discrepancy_pb(d: Discrepancy) -> pb.Discrepancy:
    return pb.Discrepancy(bank_serial=d.bank_serial, outcome=OUTCOME_PB[d.outcome], bank_account_no=d.bank_account_no,
                          mis_account_no=d.mis_account_no, bank_amount_fen=d.bank_amount_fen,
                          mis_amount_fen=d.mis_amount_fen,
                          bank_status=BANK_STATUS_PB.get(d.bank_status, pb.BANK_RECORD_STATUS_UNSPECIFIED),
                          mis_state=MIS_STATE_PB.get(d.mis_state, pb.PAYMENT_STATE_UNSPECIFIED), detail=d.detail)


def summary_pb(s: ReconSummary) -> pb.ReconcileSummary:
    out = pb.ReconcileSummary(settlement_date=s.settlement_date.isoformat(), net_settlement_fen=s.net_settlement_fen,
                              record_count=s.record_count, replayed=s.replayed, refund_count=s.refund_count,
                              refund_fen=s.refund_fen)
    for t in s.totals:
        out.totals.add(outcome=OUTCOME_PB[t.outcome], count=t.count, amount_fen=t.amount_fen)
    out.reconciled_at.FromDatetime(s.reconciled_at.astimezone(dt.UTC))
    return out


def result_stream(ctx: AdapterContext, summary: ReconSummary, due: float) -> Iterator[pb.ReconcileResponse]:
    """The day's stored discrepancy lines, then its summary; each page read with its round trips due at
    `due` (db_watch.read_by; 0: unwatched)."""
    if ctx.router.split:  # several branch databases: their lines, branch by branch
        pages = recon_branches.stored_lines(ctx.router, summary.bank_id, summary.settlement_date)
    else:
        pages = recon.stored_lines(ctx.router.primary, summary.bank_id, summary.settlement_date)
    for page in db_watch.read_by(pages, due):
        yield pb.ReconcileResponse(discrepancies=pb.DiscrepancyBatch(discrepancies=[discrepancy_pb(d) for d in page]))
    yield pb.ReconcileResponse(summary=summary_pb(summary))


# ---- proto -> domain ----
def settlement_day(ctx: AdapterContext, header: pb.ReconcileHeader) -> dt.date:
    day = fields.iso_date(header.settlement_date, "header.settlement_date")
    if day > business_date(ctx.clock):
        raise InvalidField("header.settlement_date", f"{day} is in the future: only a past or the current "
                           "business day can be reconciled")
    return day


def staged(batch: pb.BankRecordBatch, first_line_no: int) -> list[recon.StagedRecord]:
    out: list[recon.StagedRecord] = []
    for i, r in enumerate(batch.records):
        status = BANK_STATUS.get(r.status)
        if status is None:
            raise InvalidField(f"records[{first_line_no + i}].status", "must be POSTED or CANCELLED")
        out.append((first_line_no + i, r.bank_serial, r.account_no, r.amount_fen, status))
    return out




# ---- the stream ----
def reconcile(ctx: AdapterContext, bank_id: str, request_iterator: Iterator[Any], context: grpc.ServicerContext
              ) -> Iterator[pb.ReconcileResponse]:
    """The Reconcile stream of `bank_id` (the caller, as the link identified it)."""
    known_bank: str | None = None  # set once the bank is known and until the day's result is had: FAILED counts

    def failed(err: YinDianError) -> None:
        if known_bank is not None:
            bm.record_reconciliation(known_bank, "FAILED")

    silence_s = ctx.settings.recon_peer_silence_s

    def silent() -> Exception:
        return ReconPeerSilent(f"the bank sent nothing for {silence_s:g} s in the middle of its Reconcile stream: "
                               "nothing of the day was applied")

    with guard(context, "Reconcile", on_refused=failed), \
            received(request_iterator, queue_max=RECEIVE_QUEUE_MAX, silence_s=silence_s, silent=silent,
                     name=f"recon-receive-{bank_id}") as messages:
        # Its round trips are given up by the caller's deadline on a dead link (db_watch), not DB_LINK_DEAD_S
        # later with the thread held: the day's work here, the stored lines between the answer's messages.
        due = deadline_due(context.time_remaining())
        with db_watch.calls_due(due):
            ctx.banks.ensure_known(bank_id)
            known_bank = bank_id
            first = next(messages, None)
            if first is None or first.WhichOneof("body") != "header":
                raise InvalidField("header", "the first message must be the header with the settlement date")
            day = settlement_day(ctx, first.header)
            summary = _stored_summary(ctx, bank_id, day) or _reconcile_stream(ctx, bank_id, day, messages,
                                                                             _still_wanted(context))
        log.info("event=reconciled bank=%s day=%s records=%d net_fen=%d replayed=%s", bank_id, day,
                 summary.record_count, summary.net_settlement_fen, summary.replayed)
        known_bank = None
        if summary.replayed:
            bm.record_reconciliation(bank_id, "REPLAYED")
        else:
            for t in summary.totals:
                bm.record_reconcile_records(bank_id, t.outcome, t.count, t.amount_fen)
            bm.record_reconciliation(bank_id, "COMPLETED")
        yield from result_stream(ctx, summary, due)


def _stored_summary(ctx: AdapterContext, bank_id: str, day: dt.date) -> ReconSummary | None:
    if ctx.router.split:
        return recon_branches.stored_summary(ctx.router, bank_id, day)
    return recon.stored_summary(ctx.router.primary, bank_id, day)


def _still_wanted(context: grpc.ServicerContext) -> Callable[[], None]:
    """Refuses to close a day whose stream was cancelled. grpcio can end a
    stream's request iterator as if the bank had sent its last message when
    the call was in fact cancelled (both arrive as "no more messages"; the
    cancellation is marked a moment later), and the trailer is optional: a
    stream cut short must not be reconciled as the bank's whole day. Asked
    when the records end (yindian_common.stream_end, which tells the two
    apart) and again just before the close commits (a cancellation since)."""
    asked = False

    def confirm() -> None:
        nonlocal asked
        live = context.is_active() if asked else ended_by_peer(context)
        asked = True
        if not live:
            raise Aborted("the reconciliation stream was cancelled before it ended: nothing of the day was "
                          "applied", reason="STREAM_CANCELLED")
    return confirm


def _reconcile_stream(ctx: AdapterContext, bank_id: str, day: dt.date,
                      request_iterator: Iterator[Any], confirm: Callable[[], None]) -> ReconSummary:
    with recon_branches.reconciliation(ctx.router, bank_id, day, rates=ctx.rates, now=ctx.clock.now()) as run:
        trailer_seen = False
        for msg in request_iterator:
            kind = msg.WhichOneof("body")
            if trailer_seen:
                raise InvalidField("trailer", "the trailer must be the last message")
            if kind == "batch":
                run.load(staged(msg.batch, run.record_count + 1))
            elif kind == "trailer":
                run.check_trailer(msg.trailer.record_count, msg.trailer.total_fen)
                trailer_seen = True
            else:
                raise InvalidField("header", "only the first message may be a header")
        confirm()
        return run.close_day(confirm=confirm)

