"""The link to the utility: calls mis_adapter's BillingService with the bank's
identity and a deadline, and sorts every answer into exactly one of
    OK         the utility's response message
    DEFINITE   a status the utility answered with google.rpc.ErrorInfo:
               relayed to the bank core unchanged (code, message, details)
    NOT_SENT   the call provably never left the bridge: the channel had no
               connection to the utility ("failed to connect to all
               addresses", the call fails at the pick, before any stream is
               opened, as calls are made without wait_for_ready): nothing can
               have been applied, so a retry is safe (issue 9 item 3)
    IN_DOUBT   anything else (deadline, lost connection, CANCELLED, UNKNOWN,
               INTERNAL, UNAVAILABLE without ErrorInfo, and UNAVAILABLE with
               reason COMMIT_IN_DOUBT: the utility's database may have
               committed before the error): the request may or may not have
               been applied.
This module never decides what an in-doubt answer means: the resolver does."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from bridge.replicas import BILLING_SERVICE, Replica, ReplicaSet
from yindian.v1 import billing_pb2, billing_pb2_grpc
from yindian_common.metrics import UnaryClientMetrics
from yindian_common.status import DOMAIN

log = logging.getLogger("yindian.bridge.upstream")
M = TypeVar("M")

OK = "OK"
DEFINITE = "DEFINITE"
IN_DOUBT = "IN_DOUBT"
NOT_SENT = "NOT_SENT"

# ErrorInfo reasons of an answer that does not say whether the request was applied (issue 9 item 2:
# mis_adapter answers an error at or after COMMIT so).
IN_DOUBT_REASONS = frozenset({"COMMIT_IN_DOUBT"})
# gRPC core's message when a call fails at the pick because no address could be connected to: the
# request was never written to any connection.
NOT_CONNECTED_MESSAGE = "failed to connect to all addresses"
LINK_DOWN_REASON = "UTILITY_UNREACHABLE"

# Definite refusals after which the utility has written nothing and invites a retry of the same serial.
RETRY_LATER_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                               grpc.StatusCode.ABORTED})


@dataclass(frozen=True)
class Answer(Generic[M]):
    kind: str
    response: M | None = None  # the utility's message when OK
    # the google.rpc.Status of a DEFINITE error, serialized
    status_bytes: bytes | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == OK

    def reason(self) -> str:
        """The utility's ErrorInfo reason of a DEFINITE answer ('' otherwise)."""
        if self.status_bytes is None:
            return ""
        st = status_pb2.Status.FromString(self.status_bytes)
        for d in st.details:
            if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                d.Unpack(info)
                return str(info.reason)
        return ""


def classify(exc: grpc.RpcError) -> Answer[Any]:
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    message: str = exc.details() or ""  # type: ignore[attr-defined]
    try:
        st = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # details disagree with the status line: not a trustworthy answer
        st = None
    if st is not None and any(d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in st.details):
        answer: Answer[Any] = Answer(DEFINITE, status_bytes=st.SerializeToString(), code=code, message=message)
        if answer.reason() in IN_DOUBT_REASONS:
            return Answer(IN_DOUBT, code=code, message=message)
        return answer
    if code == grpc.StatusCode.UNAVAILABLE and message.startswith(NOT_CONNECTED_MESSAGE):
        return Answer(NOT_SENT, code=code, message=message)
    return Answer(IN_DOUBT, code=code, message=message)


def link_down_status(message: str) -> bytes:
    """The google.rpc.Status the bank core gets for a request that never reached the utility:
    UNAVAILABLE, nothing written, retry the same serial."""
    info = error_details_pb2.ErrorInfo(reason=LINK_DOWN_REASON, domain=DOMAIN)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0],
                             message=f"the utility is unreachable, nothing was sent; retry the same serial ({message})"[:512],
                             details=[detail]).SerializeToString()


class Upstream:
    """BillingService on mis_adapter (one of its replicas, bridge.replicas), with
    identity metadata on every call. Reads (QueryAccount, GetPayment) that fail
    at the transport are tried once more on another healthy replica; Pay and
    Cancel never are: their lost answers are in doubt, whichever replica."""

    def __init__(self, replicas: ReplicaSet, metadata: tuple[tuple[str, str], ...]) -> None:
        self.replicas = replicas
        self.metadata = metadata
        self._metrics: dict[str, UnaryClientMetrics] = {}

    @property
    def stub(self) -> billing_pb2_grpc.BillingServiceStub:
        """The current replica's stub (streams: Reconcile, BillFeed)."""
        return self.replicas.current().stub

    def _call(self, method: str, request: Any, timeout_s: float, *, read: bool = False) -> Answer[Any]:
        replica = self.replicas.current()
        answer = self._call_on(replica, method, request, timeout_s)
        if read and answer.kind in (IN_DOUBT, NOT_SENT) and answer.code == grpc.StatusCode.UNAVAILABLE:
            for other in self.replicas.others(replica)[:1]:
                answer = self._call_on(other, method, request, timeout_s)
        return answer

    def _call_on(self, replica: Replica, method: str, request: Any, timeout_s: float) -> Answer[Any]:
        metrics = self._metrics.get(method)
        if metrics is None:  # the methods are a fixed few: each added once (a race adds an equal one)
            metrics = self._metrics[method] = UnaryClientMetrics(f"/{BILLING_SERVICE}/{method}")
        try:
            return Answer(OK, response=metrics.call(getattr(replica.unary, method), request, timeout=timeout_s,
                                                    metadata=self.metadata))
        except grpc.RpcError as exc:
            answer = classify(exc)
            if answer.kind in (IN_DOUBT, NOT_SENT) and answer.code == grpc.StatusCode.UNAVAILABLE:
                self.replicas.mark_down(replica, answer.message[:80])
            return answer

    def pay(self, request: billing_pb2.PayRequest, timeout_s: float) -> Answer[billing_pb2.PayResponse]:
        return self._call("Pay", request, timeout_s)

    def cancel(self, request: billing_pb2.CancelRequest, timeout_s: float) -> Answer[billing_pb2.CancelResponse]:
        return self._call("Cancel", request, timeout_s)

    def get_payment(self, bank_serial: str, timeout_s: float) -> Answer[billing_pb2.GetPaymentResponse]:
        return self._call("GetPayment", billing_pb2.GetPaymentRequest(bank_serial=bank_serial), timeout_s, read=True)

    def query_account(self, request: billing_pb2.QueryAccountRequest, timeout_s: float
                      ) -> Answer[billing_pb2.QueryAccountResponse]:
        return self._call("QueryAccount", request, timeout_s, read=True)

    def call(self, rpc: str, request: Any, timeout_s: float) -> Answer[Any]:
        """Any unary BillingService method by name (the link's other transactions, bridge.link_relay)."""
        return self._call(rpc, request, timeout_s)


def relay(context: grpc.ServicerContext, answer: Answer[Any]) -> NoReturn:
    """Passes a non-OK answer on to the bank core: a DEFINITE one unchanged,
    an IN_DOUBT one with its code and message (queries are safe to retry)."""
    if answer.status_bytes is not None:
        context.abort_with_status(rpc_status.to_status(status_pb2.Status.FromString(answer.status_bytes)))
    context.abort(answer.code, answer.message or "utility link error")
    raise AssertionError("unreachable")  # abort raises
