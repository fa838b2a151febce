"""Undecodable request bytes are the caller's error, not ours: grpcio answers
a message it cannot parse with INTERNAL "Exception deserializing request!",
which the contract forbids. This interceptor parses requests itself and
answers INVALID_ARGUMENT naming the field `request` instead (a stream's
message fails as a domain error inside the handler, so the stream's own
guard answers it). Nothing else about a call changes."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from yindian_common.errors import InvalidField
from yindian_common.rpc_pools import same_pool
from yindian_common.status import abort

MALFORMED = "the request is not a valid protobuf message of this method"
METHODS_MAX = 512  # methods whose guarded handler is kept (a server has a few dozen)


class _Malformed:
    """What the safe deserializer returns for bytes it cannot parse."""
    __slots__ = ()


_MALFORMED = _Malformed()


def _safe(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            return _MALFORMED
    return deserialize


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    for req in requests:
        if req is _MALFORMED:
            raise InvalidField("request", MALFORMED)
        yield req


def _unary(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if request is _MALFORMED:
            abort(context, InvalidField("request", MALFORMED))
        return behavior(request, context)
    return same_pool(handle, behavior)


def _streaming(behavior: Callable[[Iterator[Any], grpc.ServicerContext], Any]
               ) -> Callable[[Iterator[Any], grpc.ServicerContext], Any]:
    def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behavior(_checked(requests), context)
    return same_pool(handle, behavior)


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """The guarded handler of a method is built once and reused while the server returns the same
    handler: a new handler object per call also defeated the caches of the interceptors outside this
    one (admission, metrics), which then rebuilt their wrappers and metric label children per call."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _guard(handler)
        if len(self._wrapped) < METHODS_MAX:
            self._wrapped[method] = (handler, wrapped)
        return wrapped


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    replace: dict[str, Any] = {"request_deserializer": _safe(handler.request_deserializer)}
    if handler.unary_unary is not None:
        replace["unary_unary"] = _unary(handler.unary_unary)
    elif handler.unary_stream is not None:
        replace["unary_stream"] = _unary(handler.unary_stream)
    elif handler.stream_unary is not None:
        replace["stream_unary"] = _streaming(handler.stream_unary)
    elif handler.stream_stream is not None:
        replace["stream_stream"] = _streaming(handler.stream_stream)
    return handler._replace(**replace)  # type: ignore[attr-defined, no-any-return]
