"""The bridge's wire edge: BillingService for the bank core.

Queries (QueryAccount, GetPayment) are validated and forwarded. Money-moving
requests (Pay, Cancel) are validated, journaled durably, forwarded, and
answered from their outcome: the utility's answer when definite (relayed
unchanged), else UNAVAILABLE "in doubt, retry the same serial" while the
resolver settles it. A retry of a journaled serial is answered from the
journal and never forwarded twice. Malformed requests never cross the link
and are never journaled."""
from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, NoReturn

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from bridge import feed_relay, recon
from bridge import journal as jn
from bridge.context import BridgeContext
from bridge.journal import Claim, Entry, Outcome
from bridge.link_relay import JOURNAL_DATABASE, relay_of
from bridge.resolver import REVERSAL_PREFIX, Resolver
from bridge.upstream import DEFINITE, NOT_SENT, RETRY_LATER_CODES, Answer, link_down_status, relay
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common import business_metrics, fields
from yindian_common.clock import business_date
from yindian_common.crash_points import armed, crash_point
from yindian_common.db import watched_until_deadline
from yindian_common.db_errors import DB_TROUBLE
from yindian_common.errors import (
    InFlight,
    InvalidField,
    Precondition,
    SerialConflict,
    SerialReversed,
    Unavailable,
)
from yindian_common.status import abort, guard

log = logging.getLogger("yindian.bridge.service")

# A duplicate waits for its original at most this many times before giving up with ABORTED.
CLAIM_ROUNDS = 3

# States whose answer the bank core takes as definite (a RETRYABLE one says BANK_SUSPENDED, say):
# recorded durably before the answer is sent.
TOLD_DEFINITE_STATES = jn.DEFINITE_STATES | {jn.RETRYABLE}

CHANNELS = frozenset({pb.CHANNEL_COUNTER, pb.CHANNEL_AUTO_DEBIT, pb.CHANNEL_ATM, pb.CHANNEL_ONLINE})
BANK_BALANCE_MAX_FEN = 10**15


# ---- validation: the same field rules the utility applies ----

def check_pay(req: pb.PayRequest) -> None:
    fields.serial(req.bank_serial, "bank_serial")
    fields.account_no(req.account_no)
    fields.amount_fen(req.amount_fen)
    fields.code(req.outlet_code, "outlet_code")
    fields.code(req.teller_id, "teller_id")
    if req.channel not in CHANNELS:
        raise InvalidField("channel", "must be COUNTER, AUTO_DEBIT, ATM or ONLINE")
    if req.HasField("bank_balance_fen") and not 0 <= req.bank_balance_fen <= BANK_BALANCE_MAX_FEN:
        raise InvalidField("bank_balance_fen", f"must be between 0 and {BANK_BALANCE_MAX_FEN} fen")


def check_cancel(req: pb.CancelRequest) -> None:
    fields.serial(req.cancel_serial, "cancel_serial")
    if req.cancel_serial.startswith(REVERSAL_PREFIX):
        raise InvalidField("cancel_serial", f"the prefix {REVERSAL_PREFIX} is reserved for the bridge's reversals")
    fields.serial(req.original_serial, "original_serial")
    fields.amount_fen(req.amount_fen)
    fields.text(req.reason, "reason", fields.REASON_MAX)


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self, bctx: BridgeContext, resolver: Resolver) -> None:
        self.bctx = bctx
        self.resolver = resolver
        self._journal = bctx.journal
        self._claims = bctx.claims
        self._writer = bctx.writer
        self._bank_id = bctx.settings.bank_id
        self._min_call_s = bctx.settings.upstream_deadline_min_s
        self._duplicate_wait_s = bctx.settings.duplicate_wait_s
        self._probe_after_ms = int(bctx.settings.retryable_probe_after_s * 1000)
        self._answer_wait_cap_s = bctx.settings.upstream_deadline_cap_s

    # ---- helpers ----

    def _timeout(self, context: grpc.ServicerContext) -> float:
        timeout_s = self.bctx.deadline_for(context)
        if timeout_s < self._min_call_s:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "too little time left to forward the request")
        return timeout_s

    # ---- queries ----

    def QueryAccount(self, request: pb.QueryAccountRequest, context: grpc.ServicerContext) -> pb.QueryAccountResponse:
        with guard(context, "QueryAccount"):
            fields.account_no(request.account_no)
        answer = self.bctx.upstream.query_account(request, self._timeout(context))
        if answer.response is None:
            relay(context, answer)
        return answer.response

    def GetPayment(self, request: pb.GetPaymentRequest, context: grpc.ServicerContext) -> pb.GetPaymentResponse:
        with guard(context, "GetPayment"):
            fields.serial(request.bank_serial, "bank_serial")
        answer = self.bctx.upstream.get_payment(request.bank_serial, self._timeout(context))
        if answer.response is None:
            relay(context, answer)
        return answer.response

    # ---- money-moving ----

    def Pay(self, request: pb.PayRequest, context: grpc.ServicerContext) -> pb.PayResponse:
        with guard(context, "Pay"):
            check_pay(request)
        now = self.bctx.clock.now()
        entry = Entry(kind=jn.PAY, serial=request.bank_serial, bank_id=self._bank_id, amount_fen=request.amount_fen,
                      state=jn.PENDING, business_date=business_date(self.bctx.clock), created_at=now,
                      updated_at=now, account_no=request.account_no, outlet_code=request.outlet_code,
                      teller_id=request.teller_id, channel=request.channel,
                      bank_balance_fen=request.bank_balance_fen if request.HasField("bank_balance_fen") else None,
                      caller=self.bctx.caller_of(context))
        return self._money_moving(entry, request, context)  # type: ignore[no-any-return]

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        with guard(context, "Cancel"):
            check_cancel(request)
        now = self.bctx.clock.now()
        entry = Entry(kind=jn.CANCEL, serial=request.cancel_serial, bank_id=self._bank_id,
                      amount_fen=request.amount_fen, state=jn.PENDING, business_date=business_date(self.bctx.clock),
                      created_at=now, updated_at=now, original_serial=request.original_serial,
                      reason=request.reason, caller=self.bctx.caller_of(context))
        return self._money_moving(entry, request, context)  # type: ignore[no-any-return]

    def _money_moving(self, entry: Entry, request: Any, context: grpc.ServicerContext) -> Any:
        timeout_s = self._timeout(context)
        deadline = time.monotonic() + timeout_s
        # The journal's reads (a retried serial's row) answer UNAVAILABLE when they fail, and are given up
        # by the caller's deadline on a dead link, not after DB_LINK_DEAD_S with the thread held.
        with guard(context, entry.kind.title(), database=JOURNAL_DATABASE), \
                watched_until_deadline(context.time_remaining()):
            return self._claimed(entry, request, context, deadline)

    def _claimed(self, entry: Entry, request: Any, context: grpc.ServicerContext, deadline: float) -> Any:
        for _round in range(CLAIM_ROUNDS):
            claim, owned = self._claims.acquire(entry.key)
            if owned:
                return self._as_owner(claim, entry, request, context, max(0.0, deadline - time.monotonic()))
            settled = self._await_original(claim, entry, context, deadline)
            if settled is not None:
                return self._reply(settled, context)
        abort(context, InFlight(f"{entry.kind.lower()} {entry.serial} is still in flight; retry the same serial"))

    def _as_owner(self, claim: Claim, entry: Entry, request: Any, context: grpc.ServicerContext,
                  timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        row = self._writer.journal_new(entry, claim)
        if not row.wait(timeout_s):
            # The journal is slow: the request is not forwarded; the writer settles the row if it lands.
            log.warning("event=journal_slow kind=%s serial=%s", entry.kind, entry.serial)
            return self._reply(entry, context)
        if not row.inserted:
            try:
                existing = self._journal.get(*entry.key)
            except DB_TROUBLE:
                # Nothing forwarded, nothing to record: the serial is let go (held, every retry would wait on
                # it until a restart), and the guard answers UNAVAILABLE.
                self._claims.release(claim)
                raise
            if existing is None:  # cannot be: the writer found it journaled
                raise RuntimeError(f"journal lost {entry.key}")
            return self._answer_journaled(claim, entry, existing, request, context,
                                          max(0.0, deadline - time.monotonic()))
        return self._forward(claim, entry, request, context, deadline - time.monotonic())

    def _forward(self, claim: Claim, entry: Entry, request: Any, context: grpc.ServicerContext,
                 timeout_s: float) -> Any:
        """Sends a journaled request (we own its claim) and answers from the outcome."""
        if timeout_s < self._min_call_s:
            outcome = jn.outcome_for(entry, jn.SUSPECT, self.bctx.clock.now(), message="no time left to forward")
            return self._reply(self._settle(claim, outcome, context), context)
        call = self.bctx.upstream.pay if entry.kind == jn.PAY else self.bctx.upstream.cancel
        crash_point("bridge.after_journal")
        answer = call(request, timeout_s)
        crash_point("bridge.after_answer")
        told = self._settle(claim, self._first_outcome(entry, answer), context)
        if log.isEnabledFor(logging.DEBUG):  # no per-pay line at INFO: it costs more than the journal write
            log.debug("event=%s serial=%s amount_fen=%d state=%s code=%s", entry.kind.lower(), entry.serial,
                      entry.amount_fen, told.state, answer.code.name)
        if armed("bridge.after_reply"):  # the bank core got its answer (OK or a refusal)
            context.add_callback(lambda: crash_point("bridge.after_reply"))
        if answer.ok and told.state in (jn.POSTED, jn.CANCELLED):
            return answer.response  # the message the journal now holds as bytes
        return self._reply(told, context)

    def _first_outcome(self, entry: Entry, answer: Answer[Any]) -> Outcome:
        at = self.bctx.clock.now()
        if answer.response is not None:  # OK
            return jn.outcome_for(entry, jn.POSTED if entry.kind == jn.PAY else jn.CANCELLED, at, status_code=0,
                                  body=answer.response.SerializeToString(), message="")
        if answer.kind == DEFINITE:
            # "Nothing written, retry later" (limits, suspension, a branch down): the serial may be sent again.
            # A pay the bank core then leaves alone is probed after retryable_probe_after_s (issue 9 item 2).
            if answer.code in RETRY_LATER_CODES:
                return jn.outcome_for(entry, jn.RETRYABLE, at, status_code=answer.code.value[0],
                                      body=answer.status_bytes, message=answer.message,
                                      next_attempt_ms=self._probe_due_ms(at))
            return jn.outcome_for(entry, jn.FAILED, at, status_code=answer.code.value[0], body=answer.status_bytes,
                                  message=answer.message)
        if answer.kind == NOT_SENT:
            # Provably never left the bridge (no connection to the utility): nothing to resolve, retry later.
            return jn.outcome_for(entry, jn.RETRYABLE, at, status_code=grpc.StatusCode.UNAVAILABLE.value[0],
                                  body=link_down_status(answer.message), message=answer.message,
                                  next_attempt_ms=self._probe_due_ms(at))
        # In doubt: due for resolution at once.
        if entry.kind == jn.PAY:
            business_metrics.record_suspect_payment(entry.bank_id)
        return jn.outcome_for(entry, jn.SUSPECT, at, message=f"in doubt: {answer.code.name}: {answer.message}",
                              next_attempt_ms=0)

    def _probe_due_ms(self, at: dt.datetime) -> int:
        return int(at.timestamp() * 1000) + self._probe_after_ms

    def _settle(self, claim: Claim, outcome: Outcome, context: grpc.ServicerContext) -> Outcome:
        """Records `outcome` and returns what the bank core may be told. An answer it takes as
        definite is sent only once durable (issue 9 item 1: what the bank core was told is what the
        journal holds); if the journal is too slow for the caller's deadline it is told "in doubt"
        instead, and a retry reads the recorded answer. Duplicates waiting on the claim are woken
        when it is released, i.e. once the outcome is durable."""
        claim.result = outcome
        waited = outcome.state in TOLD_DEFINITE_STATES
        recording = self._writer.submit(outcome, claim, waited=waited)
        if not outcome.definite:
            self.resolver.wake()
        if not waited:
            return outcome
        remaining = context.time_remaining()
        if recording.wait(self._answer_wait_cap_s if remaining is None else max(0.0, remaining)):
            return outcome
        log.warning("event=journal_slow_answer kind=%s serial=%s state=%s", outcome.kind, outcome.serial,
                    outcome.state)
        return replace(outcome, state=jn.SUSPECT)

    def _answer_journaled(self, claim: Claim, entry: Entry, existing: Entry, request: Any,
                          context: grpc.ServicerContext, timeout_s: float) -> Any:
        """A retry of a journaled serial (we own its claim)."""
        if not existing.same_request(entry):
            self._claims.release(claim)
            self._conflict(context, entry)
        if existing.state in jn.DEFINITE_STATES:
            self._claims.release(claim)
            if existing.state == jn.POSTED and self._reversed_by_cancel(existing.serial):
                abort(context, SerialReversed(f"bank_serial {existing.serial} was reversed"))
            return self._reply(existing, context)
        if existing.state == jn.RETRYABLE:
            return self._forward(claim, existing, request, context, timeout_s)
        outcome = self.resolver.resolve(existing, timeout_s)
        if not outcome.definite and outcome.state == existing.state:
            # No progress: leave the row and its back-off to the resolver (no journal write per bank retry).
            claim.finish(outcome)
            self._claims.release(claim)
            return self._reply(outcome, context)
        told = self._settle(claim, outcome, context)
        log.info("event=retry_in_doubt kind=%s serial=%s from=%s to=%s", entry.kind, entry.serial, existing.state,
                 outcome.state)
        return self._reply(told, context)

    def _reversed_by_cancel(self, bank_serial: str) -> bool:
        """The utility refuses a replayed pay once it was reversed: so does the bridge."""
        for c in self._journal.cancels_of(bank_serial):
            if c.state == jn.CANCELLED and c.body is not None and \
                    pb.CancelResponse.FromString(c.body).outcome == pb.CANCEL_OUTCOME_REVERSED:
                return True
        return False

    def _await_original(self, claim: Claim, entry: Entry, context: grpc.ServicerContext,
                        deadline: float) -> Outcome | Entry | None:
        """A duplicate of a serial another thread is acting on: waits (bounded) for
        its outcome. Returns the row to answer from, or None once the other
        thread let go of an in-doubt serial (the caller then takes it over);
        ABORTED when the original is still in flight after the wait."""
        wait_s = min(max(0.0, deadline - time.monotonic()), self._duplicate_wait_s)
        if not claim.done.wait(wait_s):
            abort(context, InFlight(f"{entry.kind.lower()} {entry.serial} is still in flight; retry the same serial"))
        existing = self._journal.get(*entry.key)
        if existing is not None and not existing.same_request(entry):
            self._conflict(context, entry)
        result = claim.result
        if isinstance(result, Outcome) and result.definite:
            return result
        # In doubt: once its outcome is recorded, try to resolve it ourselves.
        claim.released.wait(max(0.0, deadline - time.monotonic()))
        return None

    def _conflict(self, context: grpc.ServicerContext, entry: Entry) -> NoReturn:
        field = "bank_serial" if entry.kind == jn.PAY else "cancel_serial"
        abort(context, SerialConflict(f"{field} {entry.serial} was already used with different parameters",
                                      field=field))

    def _reply(self, row: Entry | Outcome, context: grpc.ServicerContext) -> Any:
        """The bank core's answer for a row in state `row.state`."""
        state = row.state
        if state == jn.POSTED:
            return pb.PayResponse.FromString(row.body or b"")
        if state == jn.CANCELLED:
            return pb.CancelResponse.FromString(row.body or b"")
        if state in (jn.FAILED, jn.RETRYABLE):
            context.abort_with_status(rpc_status.to_status(status_pb2.Status.FromString(row.body or b"")))
        if state == jn.NOT_APPLIED:
            abort(context, Precondition(f"payment {row.serial} was not applied (PAYMENT_NOT_APPLIED: reversed or "
                                        "refused at the utility); pay again under a new serial",
                                        reason="PAYMENT_NOT_APPLIED"))
        what = "payment" if row.kind == jn.PAY else "cancel"
        abort(context, Unavailable(f"{what} in doubt, retry the same serial", reason=f"{row.kind}_IN_DOUBT"))

    # ---- streams owned by other modules ----

    def Reconcile(self, request_iterator: Iterator[pb.ReconcileRequest], context: grpc.ServicerContext
                  ) -> Iterator[pb.ReconcileResponse]:
        return recon.reconcile(self.bctx, request_iterator, context)

    def BillFeed(self, request_iterator: Iterator[pb.BillFeedRequest], context: grpc.ServicerContext
                 ) -> Iterator[pb.BillFeedResponse]:
        return feed_relay.bill_feed(self.bctx, request_iterator, context)

    # ---- the link's other transactions (bridge.link_relay) ----

    def SignAgreement(self, request: pb.SignAgreementRequest, context: grpc.ServicerContext) -> pb.SignAgreementResponse:
        return relay_of(self.bctx).sign_agreement(request, context)

    def EndAgreement(self, request: pb.EndAgreementRequest, context: grpc.ServicerContext) -> pb.EndAgreementResponse:
        return relay_of(self.bctx).end_agreement(request, context)

    def ListAgreements(self, request: pb.ListAgreementsRequest, context: grpc.ServicerContext) -> pb.ListAgreementsResponse:
        return relay_of(self.bctx).list_agreements(request, context)

    def ListRefunds(self, request: pb.ListRefundsRequest, context: grpc.ServicerContext) -> pb.ListRefundsResponse:
        return relay_of(self.bctx).list_refunds(request, context)

    def AcknowledgeRefunds(self, request: pb.AcknowledgeRefundsRequest, context: grpc.ServicerContext) -> pb.AcknowledgeRefundsResponse:
        return relay_of(self.bctx).acknowledge_refunds(request, context)

    def SignOn(self, request: pb.SignOnRequest, context: grpc.ServicerContext) -> pb.SignOnResponse:
        return relay_of(self.bctx).sign_on(request, context)

    def SignOff(self, request: pb.SignOffRequest, context: grpc.ServicerContext) -> pb.SignOffResponse:
        return relay_of(self.bctx).sign_off(request, context)

    def Echo(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> pb.EchoResponse:
        return relay_of(self.bctx).echo(request, context)


