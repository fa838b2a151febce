"""grpc.aio counterparts of the sync server's per-RPC metrics, for a server whose
hot unary calls are coroutines on one event loop (bench-ratio's `--proxy-aio`
reference: is an asyncio proxy cheaper per call than the thread-pool one?).

The series are the same ones yindian_common.metrics records (grpc_server_*,
grpc_client_*), recorded the same way: started and received on entry, the
handling time, sent and handled by status code on the way out."""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from yindian_common.metrics import _OK, METHODS_MAX, UNARY, _families_for, _MethodMetrics


def _code_of(context: grpc.aio.ServicerContext, failed: bool) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode) and (code is not _OK or not failed):
        return code
    if context.cancelled():
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if failed else _OK


def _wrap_unary_unary(behavior: Callable[..., Awaitable[Any]], mm: _MethodMetrics
                      ) -> Callable[..., Awaitable[Any]]:
    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        mm.started.inc()
        mm.received.inc()
        start = time.perf_counter()
        try:
            response = await behavior(request, context)
        except BaseException:
            mm.seconds.observe(time.perf_counter() - start)
            mm.handled(_code_of(context, True)).inc()
            raise
        mm.seconds.observe(time.perf_counter() - start)
        code = _code_of(context, False)
        if code is _OK:
            mm.sent.inc()
        mm.handled(code).inc()
        return response

    return unary_unary


class AioServerMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times the coroutine unary RPCs of a grpc.aio server (others pass through)."""

    def __init__(self) -> None:
        from prometheus_client import REGISTRY
        self._fam = _families_for("server", REGISTRY)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler | None]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        mm = _MethodMetrics(self._fam, UNARY, method)
        wrapped = grpc.unary_unary_rpc_method_handler(_wrap_unary_unary(handler.unary_unary, mm),
                                                      handler.request_deserializer, handler.response_serializer)
        if len(self._wrapped) < METHODS_MAX:
            self._wrapped[method] = (handler, wrapped)
        return wrapped


class AioUnaryClientMetrics:
    """yindian_common.metrics.UnaryClientMetrics for a grpc.aio multicallable."""

    __slots__ = ("_mm",)

    def __init__(self, full_method: str) -> None:
        from prometheus_client import REGISTRY
        self._mm = _MethodMetrics(_families_for("client", REGISTRY), UNARY, full_method)

    async def call(self, multicallable: Callable[..., Any], request: Any, **kwargs: Any) -> Any:
        mm = self._mm
        mm.started.inc()
        mm.sent.inc()
        start = time.perf_counter()
        try:
            response = await multicallable(request, **kwargs)
        except grpc.RpcError as exc:
            mm.client_failed(start, exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None)
            raise
        mm.client_answered(start)
        return response
