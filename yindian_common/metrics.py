"""Prometheus exposition over HTTP for every process, and per-RPC gRPC
metrics for servers and client channels under the de-facto names of
go-grpc-prometheus:

    grpc_{server,client}_started_total        {grpc_type, grpc_service, grpc_method}
    grpc_{server,client}_handled_total        {grpc_type, grpc_service, grpc_method, grpc_code}
    grpc_{server,client}_msg_received_total   {grpc_type, grpc_service, grpc_method}
    grpc_{server,client}_msg_sent_total       {grpc_type, grpc_service, grpc_method}
    grpc_{server,client}_handling_seconds     histogram {grpc_type, grpc_service, grpc_method}

The latency histogram observes unary calls only: a stream's duration (a
bill feed lives for hours) is not a latency; streams count messages and
their final status instead.

Cost: one dictionary lookup per call resolves the method's pre-built
label children, so a unary call costs four counter increments and one
histogram observation (BASELINES.md: ~1.5 us), never string formatting.
Label values are bounded: methods come from the registered services only
(unknown methods are answered UNIMPLEMENTED by gRPC before we see them)
and codes from grpc.StatusCode.

This module must never put request content (account numbers, serials)
into labels."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

from yindian_common.rpc_pools import same_pool

try:  # _created series double the exposition for no operational use
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
except ImportError:  # pragma: no cover - older prometheus_client
    pass

__all__ = ["LATENCY_BUCKETS_S", "ClientMetricsInterceptor", "ServerMetricsInterceptor", "grpc_server_interceptors",
           "instrument_channel", "start_metrics_http"]

# Pays take ~2-3 ms end to end at zero load and must stay under 50 ms at p99.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Methods are registered service methods; this only guards the caches.
METHODS_MAX = 512

UNARY = "unary"
CLIENT_STREAM = "client_stream"
SERVER_STREAM = "server_stream"
BIDI_STREAM = "bidi_stream"
_LABELS = ("grpc_type", "grpc_service", "grpc_method")
_OK = grpc.StatusCode.OK


def start_metrics_http(host: str, port: int) -> int:
    """Starts the /metrics endpoint; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


class _Families:
    """One side's (server or client) metric families."""

    def __init__(self, side: str, registry: CollectorRegistry) -> None:
        peer = "client" if side == "server" else "server"
        self.started = Counter(f"grpc_{side}_started", f"RPCs started on the {side}.", _LABELS, registry=registry)
        self.handled = Counter(f"grpc_{side}_handled", f"RPCs completed on the {side}, by status code.",
                               (*_LABELS, "grpc_code"), registry=registry)
        self.received = Counter(f"grpc_{side}_msg_received", f"Messages the {side} received from the {peer}.",
                                _LABELS, registry=registry)
        self.sent = Counter(f"grpc_{side}_msg_sent", f"Messages the {side} sent to the {peer}.", _LABELS,
                            registry=registry)
        self.seconds = Histogram(f"grpc_{side}_handling_seconds",
                                 f"Latency of unary RPCs on the {side}, until the response (streams excluded).",
                                 _LABELS, buckets=LATENCY_BUCKETS_S, registry=registry)


class _MethodMetrics:
    """Label children of one method, resolved once."""

    __slots__ = ("started", "received", "sent", "seconds", "_handled_family", "_labels", "_handled")

    def __init__(self, fam: _Families, grpc_type: str, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        labels = (grpc_type, service or "unknown", method)
        self.started = fam.started.labels(*labels)
        self.received = fam.received.labels(*labels)
        self.sent = fam.sent.labels(*labels)
        self.seconds = fam.seconds.labels(*labels)
        self._handled_family = fam.handled
        self._labels = labels
        self._handled: dict[grpc.StatusCode, Any] = {}
        self.handled(_OK)  # the OK series exists from the first call, so rates start at 0

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled_family.labels(*self._labels, code.name)
            self._handled[code] = child
        return child

    def client_answered(self, start: float) -> None:
        """A client call that started at `start` (perf_counter) was answered OK."""
        self.seconds.observe(time.perf_counter() - start)
        self.received.inc()
        self.handled(_OK).inc()

    def client_failed(self, start: float, code: object) -> None:
        """A client call that started at `start` failed with `code` (UNKNOWN when it is not a status)."""
        self.seconds.observe(time.perf_counter() - start)
        self.handled(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN).inc()


_families_lock = threading.Lock()
_families: dict[tuple[str, int], _Families] = {}


def _families_for(side: str, registry: CollectorRegistry) -> _Families:
    # Metric families may be registered once per registry: share them between interceptors.
    key = (side, id(registry))
    with _families_lock:
        fam = _families.get(key)
        if fam is None:
            fam = _families[key] = _Families(side, registry)
        return fam


def _grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    if request_streaming:
        return BIDI_STREAM if response_streaming else CLIENT_STREAM
    return SERVER_STREAM if response_streaming else UNARY


# ---- server side ----------------------------------------------------------------------------------------------


def _failure_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The status of a handler that raised: the aborted code, CANCELLED if the client left, else UNKNOWN."""
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not _OK:
        return code
    if not context.is_active():
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _success_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The status of a handler that returned: the code it set, else OK, or CANCELLED if the client left
    (a cancelled client's request stream simply ends, so the handler cannot tell)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return _OK if context.is_active() else grpc.StatusCode.CANCELLED


class _StreamCall:
    """Records a streaming call's status exactly once: when its handler ends, or
    when gRPC terminates the call (client cancelled while the handler waited)."""

    __slots__ = ("_mm", "_context", "_done", "_lock")

    def __init__(self, mm: _MethodMetrics, context: grpc.ServicerContext) -> None:
        self._mm = mm
        self._context = context
        self._done = False
        self._lock = threading.Lock()
        if not context.add_callback(self.on_terminated):
            self.on_terminated()

    def finish(self, code: grpc.StatusCode) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._mm.handled(code).inc()

    def succeeded(self) -> None:
        self.finish(_success_code(self._context))

    def failed(self) -> None:
        self.finish(_failure_code(self._context))

    def on_terminated(self) -> None:
        # Normal ends are recorded before gRPC sends the status; reaching here first means the call was cut off.
        code = self._context.code()
        self.finish(code if isinstance(code, grpc.StatusCode) and code is not _OK else grpc.StatusCode.CANCELLED)

    def requests(self, request_iterator: Iterator[Any]) -> Iterator[Any]:
        received = self._mm.received
        for request in request_iterator:
            received.inc()
            yield request

    def responses(self, response_iterator: Iterator[Any]) -> Iterator[Any]:
        sent = self._mm.sent
        try:
            for response in response_iterator:
                sent.inc()
                yield response
        except GeneratorExit:  # gRPC stopped iterating: the call ended, on_terminated records it
            raise
        except BaseException:
            self.failed()
            raise
        self.succeeded()


def _wrap_unary_unary(behavior: Callable[..., Any], mm: _MethodMetrics) -> Callable[..., Any]:
    def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
        mm.started.inc()
        mm.received.inc()
        start = time.perf_counter()
        try:
            response = behavior(request, context)
        except BaseException:
            mm.seconds.observe(time.perf_counter() - start)
            mm.handled(_failure_code(context)).inc()
            raise
        mm.seconds.observe(time.perf_counter() - start)
        code = _success_code(context)
        if code is _OK:
            mm.sent.inc()
        mm.handled(code).inc()
        return response

    return same_pool(unary_unary, behavior)


def _wrap_unary_stream(behavior: Callable[..., Any], mm: _MethodMetrics) -> Callable[..., Any]:
    def unary_stream(request: Any, context: grpc.ServicerContext) -> Any:
        mm.started.inc()
        mm.received.inc()
        call = _StreamCall(mm, context)
        try:
            responses = behavior(request, context)
        except BaseException:
            call.failed()
            raise
        return call.responses(responses)

    return same_pool(unary_stream, behavior)


def _wrap_stream_unary(behavior: Callable[..., Any], mm: _MethodMetrics) -> Callable[..., Any]:
    def stream_unary(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        mm.started.inc()
        call = _StreamCall(mm, context)
        try:
            response = behavior(call.requests(request_iterator), context)
        except BaseException:
            call.failed()
            raise
        code = _success_code(context)
        if code is _OK:
            mm.sent.inc()
        call.finish(code)
        return response

    return same_pool(stream_unary, behavior)


def _wrap_stream_stream(behavior: Callable[..., Any], mm: _MethodMetrics) -> Callable[..., Any]:
    def stream_stream(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        mm.started.inc()
        call = _StreamCall(mm, context)
        try:
            responses = behavior(call.requests(request_iterator), context)
        except BaseException:
            call.failed()
            raise
        return call.responses(responses)

    return same_pool(stream_stream, behavior)


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str, fam: _Families) -> grpc.RpcMethodHandler:
    grpc_type = _grpc_type(handler.request_streaming, handler.response_streaming)
    mm = _MethodMetrics(fam, grpc_type, method)
    de, ser = handler.request_deserializer, handler.response_serializer
    if grpc_type == UNARY:
        return grpc.unary_unary_rpc_method_handler(_wrap_unary_unary(handler.unary_unary, mm), de, ser)
    if grpc_type == SERVER_STREAM:
        return grpc.unary_stream_rpc_method_handler(_wrap_unary_stream(handler.unary_stream, mm), de, ser)
    if grpc_type == CLIENT_STREAM:
        return grpc.stream_unary_rpc_method_handler(_wrap_stream_unary(handler.stream_unary, mm), de, ser)
    return grpc.stream_stream_rpc_method_handler(_wrap_stream_stream(handler.stream_stream, mm), de, ser)


class ServerMetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC the server handles. The wrapped handler of a
    method is built once and reused while the server returns the same handler."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._fam = _families_for("server", registry)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap_handler(handler, method, self._fam)
        if len(self._wrapped) < METHODS_MAX:
            self._wrapped[method] = (handler, wrapped)
        return wrapped


def grpc_server_interceptors() -> list[grpc.ServerInterceptor]:
    """Interceptors every server installs (per-RPC metrics)."""
    return [ServerMetricsInterceptor()]


# ---- client side ----------------------------------------------------------------------------------------------


class _CountedResponses:
    """A response-stream call that counts the messages read; everything else
    (cancel, code, add_done_callback, ...) goes to the underlying call."""

    __slots__ = ("_call", "_received")

    def __init__(self, call: Any, received: Any) -> None:
        self._call = call
        self._received = received

    def __iter__(self) -> _CountedResponses:
        return self

    def __next__(self) -> Any:
        response = next(self._call)
        self._received.inc()
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


def _counted(request_iterator: Iterator[Any], sent: Any) -> Iterator[Any]:
    for request in request_iterator:
        sent.inc()
        yield request


class ClientMetricsInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                               grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """grpc_client_* metrics for every call made through the intercepted channel."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._fam = _families_for("client", registry)
        self._methods: dict[tuple[str, str], _MethodMetrics] = {}

    def _metrics(self, details: grpc.ClientCallDetails, grpc_type: str) -> _MethodMetrics:
        method = details.method
        if isinstance(method, bytes):
            method = method.decode("ascii", "replace")
        key = (method, grpc_type)
        mm = self._methods.get(key)
        if mm is None:
            mm = _MethodMetrics(self._fam, grpc_type, method)
            if len(self._methods) < METHODS_MAX:
                self._methods[key] = mm
        return mm

    @staticmethod
    def _on_done(mm: _MethodMetrics, start: float | None, response_counted: bool) -> Callable[[Any], None]:
        def done(call: Any) -> None:
            code = call.code()
            if not isinstance(code, grpc.StatusCode):
                code = grpc.StatusCode.UNKNOWN
            if start is not None:
                mm.seconds.observe(time.perf_counter() - start)
            if response_counted and code is _OK:
                mm.received.inc()
            mm.handled(code).inc()

        return done

    def intercept_unary_unary(self, continuation: Any, client_call_details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        mm = self._metrics(client_call_details, UNARY)
        mm.started.inc()
        mm.sent.inc()
        start = time.perf_counter()
        outcome = continuation(client_call_details, request)
        outcome.add_done_callback(self._on_done(mm, start, True))
        return outcome

    def intercept_unary_stream(self, continuation: Any, client_call_details: grpc.ClientCallDetails,
                               request: Any) -> Any:
        mm = self._metrics(client_call_details, SERVER_STREAM)
        mm.started.inc()
        mm.sent.inc()
        call = continuation(client_call_details, request)
        call.add_done_callback(self._on_done(mm, None, False))
        return _CountedResponses(call, mm.received)

    def intercept_stream_unary(self, continuation: Any, client_call_details: grpc.ClientCallDetails,
                               request_iterator: Iterator[Any]) -> Any:
        mm = self._metrics(client_call_details, CLIENT_STREAM)
        mm.started.inc()
        outcome = continuation(client_call_details, _counted(request_iterator, mm.sent))
        outcome.add_done_callback(self._on_done(mm, None, True))
        return outcome

    def intercept_stream_stream(self, continuation: Any, client_call_details: grpc.ClientCallDetails,
                                request_iterator: Iterator[Any]) -> Any:
        mm = self._metrics(client_call_details, BIDI_STREAM)
        mm.started.inc()
        call = continuation(client_call_details, _counted(request_iterator, mm.sent))
        call.add_done_callback(self._on_done(mm, None, False))
        return _CountedResponses(call, mm.received)


class UnaryClientMetrics:
    """The grpc_client_* series of one unary method, recorded around a call made on a channel
    without the interceptor, exactly as ClientMetricsInterceptor records them. For hot unary
    calls: grpcio's intercepted-channel path (call details, continuation, the outcome object and
    its done callback) cost 55-100 us of the calling thread per call on top of the call itself
    (170-185 us), measured in-process against a local server."""

    __slots__ = ("_mm",)

    def __init__(self, full_method: str, registry: CollectorRegistry = REGISTRY) -> None:
        self._mm = _MethodMetrics(_families_for("client", registry), UNARY, full_method)

    def call(self, multicallable: Callable[..., Any], request: Any, **kwargs: Any) -> Any:
        """`multicallable(request, **kwargs)` (a blocking unary call), counted and timed."""
        mm = self._mm
        mm.started.inc()
        mm.sent.inc()
        start = time.perf_counter()
        try:
            response = multicallable(request, **kwargs)
        except grpc.RpcError as exc:
            mm.client_failed(start, exc.code() if isinstance(exc, grpc.Call) else None)
            raise
        mm.client_answered(start)
        return response


_client_interceptor_lock = threading.Lock()
_client_interceptor: ClientMetricsInterceptor | None = None


def instrument_channel(channel: grpc.Channel) -> grpc.Channel:
    """Wraps a client channel with per-RPC client metrics (grpc_client_*)."""
    global _client_interceptor
    with _client_interceptor_lock:
        if _client_interceptor is None:
            _client_interceptor = ClientMetricsInterceptor()
        interceptor = _client_interceptor
    return grpc.intercept_channel(channel, interceptor)
