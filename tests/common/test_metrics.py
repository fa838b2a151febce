"""Per-RPC gRPC metrics: a real in-process server with the metrics interceptor
and a real client channel wrapped by `instrument_channel`, calls of all four
shapes, and the counters each call must move (and only those)."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest

from tests.support.waiting import wait_until
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.metrics import grpc_server_interceptors, instrument_channel

pytestmark = pytest.mark.timeout(60)

SERVICE = "yindian.test.Echo"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
WAIT_S = 10.0


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such account")
    if request == b"bug":
        raise RuntimeError("a bug")
    if request == b"set-code":
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("day closed")
        return b""
    return request


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"%d" % i
    if request == b"3":
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "window full")


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"%d" % sum(1 for _ in requests)


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    """Echoes, then holds the stream open until the client leaves (a bill feed's shape). gRPC may show a
    client's cancel as the end of its requests, so the handler must not take that end as its own."""
    ended = threading.Event()
    context.add_callback(ended.set)
    yield from requests
    ended.wait(WAIT_S)


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
    "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
    "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
}


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=grpc_server_interceptors())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, HANDLERS)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ch = instrument_channel(grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        yield ch
    finally:
        ch.close()
        server.stop(None).wait(5)


def value(name: str, **labels: str) -> float:
    v = REGISTRY.get_sample_value(name, labels)
    return 0.0 if v is None else v


def labels_of(grpc_type: str, method: str, **extra: str) -> dict[str, str]:
    return {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method, **extra}


class Delta:
    """Samples of the counters of interest, read before and after an action."""

    def __init__(self, side: str, grpc_type: str, method: str) -> None:
        self.side, self.labels = side, labels_of(grpc_type, method)
        self.before = self._read()

    def _read(self) -> dict[str, float]:
        p, lab = f"grpc_{self.side}", self.labels
        out = {k: value(f"{p}_{k}_total", **lab) for k in ("started", "msg_received", "msg_sent")}
        out["latency_count"] = value(f"{p}_handling_seconds_count", **lab)
        for code in ("OK", "NOT_FOUND", "UNKNOWN", "FAILED_PRECONDITION", "CANCELLED", "RESOURCE_EXHAUSTED"):
            out[code] = value(f"{p}_handled_total", **lab, grpc_code=code)
        return out

    def moved(self) -> dict[str, float]:
        after = self._read()
        return {k: after[k] - self.before[k] for k in after if after[k] != self.before[k]}



def call(channel: grpc.Channel, method: str, kind: str) -> Any:
    path = f"/{SERVICE}/{method}"
    return getattr(channel, kind)(path)


def test_unary_ok_counts_one_start_one_message_each_way_and_one_latency(channel: grpc.Channel) -> None:
    server, client = Delta("server", "unary", "Unary"), Delta("client", "unary", "Unary")
    for _ in range(3):
        assert call(channel, "Unary", "unary_unary")(b"hello", timeout=5) == b"hello"
    expected = {"started": 3, "msg_received": 3, "msg_sent": 3, "latency_count": 3, "OK": 3}
    assert server.moved() == expected
    assert client.moved() == expected


@pytest.mark.parametrize("request_body,code", [(b"missing", "NOT_FOUND"), (b"bug", "UNKNOWN"),
                                               (b"set-code", "FAILED_PRECONDITION")])
def test_unary_failure_is_counted_under_its_code(channel: grpc.Channel, request_body: bytes, code: str) -> None:
    server, client = Delta("server", "unary", "Unary"), Delta("client", "unary", "Unary")
    with pytest.raises(grpc.RpcError) as err:
        call(channel, "Unary", "unary_unary")(request_body, timeout=5)
    assert err.value.code().name == code
    # The request went in; no response message came back; the failed call still has a latency.
    assert server.moved() == {"started": 1, "msg_received": 1, "latency_count": 1, code: 1}
    assert client.moved() == {"started": 1, "msg_sent": 1, "latency_count": 1, code: 1}


def test_unary_future_and_with_call_are_counted_once(channel: grpc.Channel) -> None:
    client = Delta("client", "unary", "Unary")
    fut = call(channel, "Unary", "unary_unary").future(b"a", timeout=5)
    assert fut.result() == b"a"
    resp, c = call(channel, "Unary", "unary_unary").with_call(b"b", timeout=5)
    assert resp == b"b" and c.code() == grpc.StatusCode.OK
    bad = call(channel, "Unary", "unary_unary").future(b"missing", timeout=5)
    assert bad.exception() is not None
    wait_until(lambda: client.moved().get("NOT_FOUND") == 1, "the future's failure to be counted", WAIT_S)
    assert client.moved() == {"started": 3, "msg_sent": 3, "msg_received": 2, "latency_count": 3, "OK": 2,
                              "NOT_FOUND": 1}


def test_server_stream_counts_messages_and_no_latency(channel: grpc.Channel) -> None:
    server = Delta("server", "server_stream", "ServerStream")
    client = Delta("client", "server_stream", "ServerStream")
    assert list(call(channel, "ServerStream", "unary_stream")(b"5", timeout=5)) == [b"0", b"1", b"2", b"3", b"4"]
    wait_until(lambda: server.moved().get("OK") == 1, "the server stream's status", WAIT_S)
    assert server.moved() == {"started": 1, "msg_received": 1, "msg_sent": 5, "OK": 1}
    assert client.moved() == {"started": 1, "msg_sent": 1, "msg_received": 5, "OK": 1}


def test_server_stream_abort_after_messages_counts_its_code(channel: grpc.Channel) -> None:
    server = Delta("server", "server_stream", "ServerStream")
    client = Delta("client", "server_stream", "ServerStream")
    got: list[bytes] = []
    with pytest.raises(grpc.RpcError) as err:
        for m in call(channel, "ServerStream", "unary_stream")(b"3", timeout=5):
            got.append(m)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(got) == 3
    wait_until(lambda: client.moved().get("RESOURCE_EXHAUSTED") == 1, "the client's status", WAIT_S)
    assert server.moved() == {"started": 1, "msg_received": 1, "msg_sent": 3, "RESOURCE_EXHAUSTED": 1}
    assert client.moved() == {"started": 1, "msg_sent": 1, "msg_received": 3, "RESOURCE_EXHAUSTED": 1}


def test_client_stream_counts_each_request(channel: grpc.Channel) -> None:
    server = Delta("server", "client_stream", "ClientStream")
    client = Delta("client", "client_stream", "ClientStream")
    assert call(channel, "ClientStream", "stream_unary")(iter([b"x"] * 7), timeout=5) == b"7"
    expected = {"started": 1, "msg_received": 7, "msg_sent": 1, "OK": 1}
    assert server.moved() == expected
    assert client.moved() == {"started": 1, "msg_sent": 7, "msg_received": 1, "OK": 1}


def test_bidi_cancelled_by_client_is_counted_cancelled_not_timed(channel: grpc.Channel) -> None:
    server = Delta("server", "bidi_stream", "Bidi")
    client = Delta("client", "bidi_stream", "Bidi")
    gate = threading.Event()

    def requests() -> Iterator[bytes]:
        yield b"one"
        yield b"two"
        gate.wait(WAIT_S)  # the stream stays open, like a bill feed, until the client goes away

    stream = call(channel, "Bidi", "stream_stream")(requests(), timeout=30)
    assert next(stream) == b"one" and next(stream) == b"two"
    stream.cancel()
    gate.set()
    wait_until(lambda: server.moved().get("CANCELLED") == 1, "the server to see the cancellation", WAIT_S)
    wait_until(lambda: client.moved().get("CANCELLED") == 1, "the client to see the cancellation", WAIT_S)
    assert server.moved() == {"started": 1, "msg_received": 2, "msg_sent": 2, "CANCELLED": 1}
    assert client.moved() == {"started": 1, "msg_sent": 2, "msg_received": 2, "CANCELLED": 1}


def test_unknown_method_adds_no_series(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary(f"/{SERVICE}/NoSuchMethod")(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert REGISTRY.get_sample_value("grpc_server_started_total",
                                     labels_of("unary", "NoSuchMethod")) is None


def test_exposition_passes_promtool(channel: grpc.Channel) -> None:
    call(channel, "Unary", "unary_unary")(b"x", timeout=5)
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool not installed and CI=true requires it (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    out = subprocess.run([promtool, "check", "metrics"], input=generate_latest(REGISTRY), capture_output=True,
                         timeout=30)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


class QueryServicer(billing_pb2_grpc.BillingServiceServicer):
    def QueryAccount(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.QueryAccountResponse(account_no=request.account_no)


@pytest.fixture
def wraps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The methods whose handlers the metrics interceptor wrapped, in order."""
    from yindian_common import metrics

    seen: list[str] = []
    real_wrap = metrics._wrap_handler

    def counting_wrap(handler: grpc.RpcMethodHandler, method: str, fam: Any) -> grpc.RpcMethodHandler:
        seen.append(method)
        return real_wrap(handler, method, fam)

    monkeypatch.setattr(metrics, "_wrap_handler", counting_wrap)
    return seen


def test_generated_service_handler_is_wrapped_once_and_reused(wraps: list[str]) -> None:
    """The per-call cost claim rests on this: label children are resolved once per method, not per call."""


    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=grpc_server_interceptors())
    billing_pb2_grpc.add_BillingServiceServicer_to_server(QueryServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = billing_pb2_grpc.BillingServiceStub(ch)
            for _ in range(5):
                stub.QueryAccount(pb.QueryAccountRequest(account_no="0100000017"), timeout=5)
    finally:
        server.stop(None).wait(5)
    assert wraps == ["/yindian.v1.BillingService/QueryAccount"]


def test_full_server_stack_wraps_each_method_once(wraps: list[str]) -> None:
    """The same through GrpcServer's whole interceptor stack (metrics outermost, an admission guard,
    the malformed-request guard innermost): an inner interceptor that built a new handler per call
    made the outer ones rebuild their wrappers and label children on every call."""
    from yindian_common.identity import AdmissionInterceptor
    from yindian_common.server import GrpcServer, ServerLimits


    server = GrpcServer(listen="127.0.0.1:0", limits=ServerLimits(max_workers=2), tls=None, insecure=True,
                        interceptors=grpc_server_interceptors(),
                        guards=[AdmissionInterceptor(lambda _context, _rpc: None)])
    server.add_service("yindian.v1.BillingService", billing_pb2_grpc.add_BillingServiceServicer_to_server,
                       QueryServicer())
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = billing_pb2_grpc.BillingServiceStub(ch)
            answers = [stub.QueryAccount(pb.QueryAccountRequest(account_no="0100000017"), timeout=5).account_no
                       for _ in range(5)]
            with pytest.raises(grpc.RpcError) as bad:  # the malformed-request guard still answers
                ch.unary_unary("/yindian.v1.BillingService/QueryAccount")(b"\xff\xff\xff", timeout=5)
    finally:
        server.stop()
    assert answers == ["0100000017"] * 5
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert wraps == ["/yindian.v1.BillingService/QueryAccount"]
