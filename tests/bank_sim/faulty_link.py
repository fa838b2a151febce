"""A fault-injecting link for tests: a real gRPC server on loopback that
forwards BillingService calls byte for byte to a real upstream, except where
a rule says to fail a call before forwarding it (nothing applied), to lose the
answer after forwarding it (applied, outcome unknown to the caller), or to
refuse it definitely. Only the wire contract is used."""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from enum import Enum
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from yindian.v1 import billing_pb2

SERVICE = "yindian.v1.BillingService"


class Fault(Enum):
    PASS = "pass"
    UNAVAILABLE_BEFORE = "unavailable_before"  # never reaches the utility
    LOSE_ANSWER = "lose_answer"  # the utility applies it, the caller hears UNAVAILABLE
    REFUSE = "refuse"  # a definite INVALID_ARGUMENT, never reaches the utility
    # the utility applies it, the caller hears UNAVAILABLE with ErrorInfo COMMIT_IN_DOUBT (a lost COMMIT reply)
    COMMIT_IN_DOUBT = "commit_in_doubt"
    # the utility applies it, the caller hears UNAVAILABLE with ErrorInfo DB_UNAVAILABLE ("nothing written":
    # what mis_adapter answered for a lost COMMIT reply before issue 9 item 2)
    FALSE_REFUSAL = "false_refusal"


# rule(rpc, serial, attempt) -> Fault; attempt counts from 1 per (rpc, serial)
Rule = Callable[[str, str, int], Fault]


def _serial_of(rpc: str, raw: bytes) -> str:
    if rpc == "Pay":
        return str(billing_pb2.PayRequest.FromString(raw).bank_serial)
    if rpc == "Cancel":
        return str(billing_pb2.CancelRequest.FromString(raw).cancel_serial)
    if rpc == "QueryAccount":
        return str(billing_pb2.QueryAccountRequest.FromString(raw).account_no)
    return ""


class FaultyLink:
    def __init__(self, upstream: str, rule: Rule) -> None:
        self._channel = grpc.insecure_channel(upstream)
        self._rule = rule
        self._lock = threading.Lock()
        self.attempts: dict[tuple[str, str], int] = {}
        self.faults: dict[Fault, int] = {f: 0 for f in Fault}
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self._server.add_generic_rpc_handlers((_Handler(self),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyLink:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(5).wait(10)
        self._channel.close()

    def forward(self, rpc: str, raw: bytes, context: grpc.ServicerContext) -> bytes:
        serial = _serial_of(rpc, raw)
        with self._lock:
            n = self.attempts[(rpc, serial)] = self.attempts.get((rpc, serial), 0) + 1
            fault = self._rule(rpc, serial, n)
            self.faults[fault] += 1
        if fault is Fault.UNAVAILABLE_BEFORE:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected: link down")
        if fault is Fault.REFUSE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "injected: refused")
        call = self._channel.unary_unary(f"/{SERVICE}/{rpc}")
        metadata = tuple((k, v) for k, v in context.invocation_metadata() if k.startswith("x-yindian"))
        try:
            answer: bytes = call(raw, timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")  # type: ignore[attr-defined]
        if fault is Fault.LOSE_ANSWER:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected: answer lost")
        if fault is Fault.COMMIT_IN_DOUBT:
            _abort_with_reason(context, "COMMIT_IN_DOUBT", "injected: connection lost at COMMIT")
        if fault is Fault.FALSE_REFUSAL:
            _abort_with_reason(context, "DB_UNAVAILABLE", "injected: branch database unavailable")
        return answer


def _abort_with_reason(context: grpc.ServicerContext, reason: str, message: str) -> None:
    """UNAVAILABLE with google.rpc.ErrorInfo, as mis_adapter answers."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="yindian"))
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(
        code=grpc.StatusCode.UNAVAILABLE.value[0], message=message, details=[detail])))


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, link: FaultyLink) -> None:
        self._link = link

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if not method.startswith(f"/{SERVICE}/"):
            return None
        rpc = method.rsplit("/", 1)[1]
        return grpc.unary_unary_rpc_method_handler(lambda raw, ctx: self._link.forward(rpc, raw, ctx))
