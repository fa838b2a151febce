"""The link's other transactions through the bridge: agreements (Sign/End/
ListAgreements), refunds (ListRefunds/AcknowledgeRefunds), SignOn, SignOff
and Echo. BillingServicer delegates each RPC here.

Every request is checked against the field rules before it crosses the link
(a malformed one is refused here, INVALID_ARGUMENT naming the field, and
never journaled), forwarded with the bank's identity stamped on the call,
and the utility's answer relayed unchanged. SignAgreement, EndAgreement,
AcknowledgeRefunds, SignOn and SignOff are journaled before forwarding and
their answer after (bridge.link_journal); all are idempotent at the utility,
so an answer that never came is settled by the bank core sending the same
request again (UNAVAILABLE tells it so).

At start the bridge signs the bank on (`sign_on_at_start`: retried with a
capped back-off until the utility answers); the bank core signs off at day
end with SignOff (`python -m bridge sign-off --target BRIDGE`). Echo answers
the utility's view of the link plus the round trip it measured."""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import grpc
from prometheus_client import Gauge

from bridge.link_journal import (
    ANSWERED,
    END_AGREEMENT,
    IN_DOUBT,
    REFUND_ACK,
    REQUESTED,
    SIGN_AGREEMENT,
    SIGN_OFF,
    SIGN_ON,
    LinkJournal,
    LinkLine,
    create_schema,
)
from bridge.upstream import OK, Answer, relay
from yindian.v1 import billing_pb2 as pb
from yindian_common import fields
from yindian_common.db import watched_until_deadline
from yindian_common.db_errors import DB_TROUBLE, is_trouble
from yindian_common.errors import InvalidField, Unavailable, YinDianError
from yindian_common.status import abort, guard

log = logging.getLogger("yindian.bridge.link")

PAGE_SIZE_MAX = 500          # the utility's page bound for ListAgreements / ListRefunds
ACKS_MAX = 500               # acknowledgements per AcknowledgeRefunds
_NONCE_RE = re.compile(r"[A-Za-z0-9-]{0,32}")

LINK_ROUND_TRIP = Gauge("yindian_link_round_trip_seconds", "Round trip of the last Echo to the utility.", ["bank"])


def check_sign(req: pb.SignAgreementRequest) -> None:
    fields.serial(req.agreement_serial, "agreement_serial")
    fields.account_no(req.account_no)
    fields.serial(req.savings_account_ref, "savings_account_ref")
    if req.HasField("debit_limit_fen"):
        fields.amount_fen(req.debit_limit_fen, "debit_limit_fen")
    if req.start_date:
        fields.iso_date(req.start_date, "start_date")


def check_end(req: pb.EndAgreementRequest) -> None:
    fields.serial(req.end_serial, "end_serial")
    fields.account_no(req.account_no)
    fields.text(req.reason, "reason", fields.REASON_MAX)


def check_page(page_size: int) -> None:
    if not 0 <= page_size <= PAGE_SIZE_MAX:
        raise InvalidField("page_size", f"must be between 1 and {PAGE_SIZE_MAX} (0: the default)")


def check_acks(req: pb.AcknowledgeRefundsRequest) -> None:
    if not req.acks:
        raise InvalidField("acks", "at least one acknowledgement is required")
    if len(req.acks) > ACKS_MAX:
        raise InvalidField("acks", f"at most {ACKS_MAX} acknowledgements per call")
    for i, a in enumerate(req.acks):
        if a.refund_id <= 0:
            raise InvalidField(f"acks[{i}].refund_id", "must be positive")
        fields.serial(a.credit_serial, f"acks[{i}].credit_serial")
        fields.amount_fen(a.amount_fen, f"acks[{i}].amount_fen")


def check_nonce(nonce: str) -> None:
    if not nonce.isascii() or not _NONCE_RE.fullmatch(nonce):
        raise InvalidField("nonce", "must be at most 32 characters of A-Z a-z 0-9 -")


def _outcome(answer: Answer) -> str:
    if answer.ok:
        return "OK"
    return answer.code.name if answer.status_bytes is not None else IN_DOUBT


def relay_of(bctx: Any) -> LinkRelay:
    """The process's LinkRelay (its journal schema created), built on first use and kept on the context."""
    relay_ = getattr(bctx, "link_relay", None)
    if relay_ is None:
        with _RELAY_LOCK:
            relay_ = getattr(bctx, "link_relay", None)
            if relay_ is None:
                create_schema(bctx.engine)
                relay_ = LinkRelay(bctx, LinkJournal(bctx.engine, bctx.settings.bank_id))
                bctx.link_relay = relay_
    return relay_  # type: ignore[no-any-return]


_RELAY_LOCK = threading.Lock()


# How a refusal for want of the bridge's own database names it.
JOURNAL_DATABASE = "bridge journal database"


class LinkRelay:
    def __init__(self, bctx: Any, journal: LinkJournal) -> None:
        self.bctx = bctx
        self.journal = journal
        self.bank_id: str = bctx.settings.bank_id

    def _timeout(self, context: grpc.ServicerContext) -> float:
        timeout_s: float = self.bctx.deadline_for(context)
        if timeout_s < self.bctx.settings.upstream_deadline_min_s:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "too little time left to forward the request")
        return timeout_s

    def _check(self, context: grpc.ServicerContext, check: Any, *args: Any) -> None:
        try:
            check(*args)
        except YinDianError as err:
            abort(context, err)

    def _forward(self, rpc: str, request: Any, context: grpc.ServicerContext,
                 journaled: list[LinkLine] | None = None) -> Any:
        timeout_s = self._timeout(context)
        # The journal's writes are given up by the caller's deadline on a dead link (not after
        # DB_LINK_DEAD_S with the serving thread held), and answered as the journal down.
        with guard(context, rpc, database=JOURNAL_DATABASE), \
                watched_until_deadline(context.time_remaining()):
            return self._journaled_call(rpc, request, context, timeout_s, journaled)

    def _journaled_call(self, rpc: str, request: Any, context: grpc.ServicerContext, timeout_s: float,
                        journaled: list[LinkLine] | None) -> Any:
        if journaled:
            # The journal down: nothing is forwarded, UNAVAILABLE naming it (before, the driver's error
            # escaped the handler and the bank heard UNKNOWN with its text).
            self.journal.write(journaled, REQUESTED, self.bctx.clock.now())
        answer = self.bctx.upstream.call(rpc, request, timeout_s)
        if journaled:
            try:
                self.journal.write(journaled, ANSWERED, self.bctx.clock.now(), _outcome(answer),
                                   "" if answer.ok else answer.message)
            except DB_TROUBLE as exc:
                if not is_trouble(exc):
                    raise
                # Forwarded (and perhaps applied: every journaled link call is idempotent at the utility),
                # but its answer is not journaled: the bank sends the same request again.
                log.warning("event=link_answer_not_journaled rpc=%s outcome=%s", rpc, _outcome(answer))
                abort(context, Unavailable(f"{rpc} was forwarded but its answer could not be journaled "
                                           f"({JOURNAL_DATABASE} unavailable): send the same request again",
                                           reason="ANSWER_NOT_JOURNALED"))
        log.info("event=link_call rpc=%s outcome=%s", rpc, _outcome(answer))
        if not answer.ok:
            if answer.status_bytes is None and journaled:
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"{rpc} in doubt ({answer.code.name}): send the same request again")
            relay(context, answer)
        return answer.response

    # ---- agreements ----
    def sign_agreement(self, req: pb.SignAgreementRequest, context: grpc.ServicerContext) -> Any:
        self._check(context, check_sign, req)
        return self._forward("SignAgreement", req, context,
                             [LinkLine(SIGN_AGREEMENT, req.agreement_serial, req.account_no)])

    def end_agreement(self, req: pb.EndAgreementRequest, context: grpc.ServicerContext) -> Any:
        self._check(context, check_end, req)
        return self._forward("EndAgreement", req, context, [LinkLine(END_AGREEMENT, req.end_serial, req.account_no)])

    def list_agreements(self, req: pb.ListAgreementsRequest, context: grpc.ServicerContext) -> Any:
        self._check(context, check_page, req.page_size)
        if req.account_no:
            self._check(context, fields.account_no, req.account_no)
        return self._forward("ListAgreements", req, context)

    # ---- refunds ----
    def list_refunds(self, req: pb.ListRefundsRequest, context: grpc.ServicerContext) -> Any:
        self._check(context, check_page, req.page_size)
        return self._forward("ListRefunds", req, context)

    def acknowledge_refunds(self, req: pb.AcknowledgeRefundsRequest, context: grpc.ServicerContext) -> Any:
        self._check(context, check_acks, req)
        return self._forward("AcknowledgeRefunds", req, context,
                             [LinkLine(REFUND_ACK, a.credit_serial, "", a.amount_fen) for a in req.acks])

    # ---- sign-on, sign-off, echo ----
    def sign_on(self, req: pb.SignOnRequest, context: grpc.ServicerContext) -> Any:
        return self._forward("SignOn", req, context, [LinkLine(SIGN_ON)])

    def sign_off(self, req: pb.SignOffRequest, context: grpc.ServicerContext) -> Any:
        return self._forward("SignOff", req, context, [LinkLine(SIGN_OFF)])

    def echo(self, req: pb.EchoRequest, context: grpc.ServicerContext) -> Any:
        self._check(context, check_nonce, req.nonce)
        started = time.perf_counter()
        resp = self._forward("Echo", req, context)
        rtt_s = time.perf_counter() - started
        LINK_ROUND_TRIP.labels(self.bank_id).set(rtt_s)
        out = pb.EchoResponse()
        out.CopyFrom(resp)
        out.link_round_trip_us = int(rtt_s * 1_000_000)
        return out

    # ---- at start ----
    def sign_on_at_start(self, stop: threading.Event, *, initial_s: float, cap_s: float,
                         call_timeout_s: float) -> threading.Thread:
        """Signs the bank on in the background, retrying (capped back-off) until the utility answers."""
        def run() -> None:
            delay_s = initial_s
            while not stop.is_set():
                now = self.bctx.clock.now()
                self.journal.write([LinkLine(SIGN_ON)], REQUESTED, now)
                answer = self.bctx.upstream.call("SignOn", pb.SignOnRequest(), call_timeout_s)
                self.journal.write([LinkLine(SIGN_ON)], ANSWERED, self.bctx.clock.now(), _outcome(answer),
                                   "" if answer.ok else answer.message)
                if answer.kind == OK:
                    link = answer.response.link
                    log.info("event=signed_on_at_start business_date=%s suspended=%s", link.business_date,
                             link.suspended)
                    return
                log.warning("event=sign_on_failed code=%s retry_in_s=%.1f", answer.code.name, delay_s)
                stop.wait(delay_s)
                delay_s = min(cap_s, delay_s * 2)

        t = threading.Thread(target=run, name="sign-on", daemon=True)
        t.start()
        return t
