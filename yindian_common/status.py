"""The edge between domain errors and gRPC statuses: servers abort with a
status carrying google.rpc.ErrorInfo (stable reason, field); clients read it.

`guard` is the one status guard every servicer wraps its work in: an expected
refusal (the yindian_common.errors tree, database trouble included) is logged
and answered with its status; a bug passes on."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from yindian_common.db_errors import translated
from yindian_common.errors import YinDianError

log = logging.getLogger("yindian.status")

DOMAIN = "yindian"
T = TypeVar("T")


class StatusGuard:
    """See `guard`. A plain class, not contextlib: it wraps every Pay."""
    __slots__ = ("context", "rpc", "database", "on_refused")

    def __init__(self, context: grpc.ServicerContext, rpc: str, database: str,
                 on_refused: Callable[[YinDianError], None] | None) -> None:
        self.context = context
        self.rpc = rpc
        self.database = database
        self.on_refused = on_refused

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(exc, YinDianError):
            err = exc
        elif isinstance(exc, (PoolTimeout, OperationalError)):
            err = translated(exc, self.database)
            err.__cause__ = exc
        else:
            return  # no error, the call ending (GeneratorExit, an abort), or a bug: passed on
        log.info("event=refused rpc=%s code=%s reason=%s msg=%r", self.rpc, err.code, err.reason, err.message)
        if self.on_refused is not None:
            self.on_refused(err)
        abort(self.context, err)


def guard(context: grpc.ServicerContext, rpc: str, *, database: str = "branch database",
          on_refused: Callable[[YinDianError], None] | None = None) -> StatusGuard:
    """`with guard(context, rpc): ...` runs the block of RPC `rpc`; an expected
    refusal raised inside it (a YinDianError, or database trouble: UNAVAILABLE
    naming `database`) aborts the call with its status, after `on_refused(err)`
    (e.g. a metric). Anything else is a bug and passes on untouched (gRPC logs
    it with its traceback); it is never mapped to an expected status."""
    return StatusGuard(context, rpc, database, on_refused)


def guard_stream(context: grpc.ServicerContext, rpc: str, responses: Iterator[T], *,
                 database: str = "branch database",
                 on_refused: Callable[[YinDianError], None] | None = None) -> Iterator[T]:
    """`responses` of a streaming RPC, under `guard`."""
    with guard(context, rpc, database=database, on_refused=on_refused):
        yield from responses


def abort(context: grpc.ServicerContext, err: YinDianError) -> NoReturn:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN)
    if err.field:
        info.metadata["field"] = err.field
    detail = any_pb2.Any()
    detail.Pack(info)
    code = grpc.StatusCode[err.code]
    st = status_pb2.Status(code=code.value[0], message=err.message, details=[detail])
    context.abort_with_status(rpc_status.to_status(st))
    raise AssertionError("unreachable")  # abort_with_status raises


def error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo a YinDian server attached, if any."""
    st = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if st is None:
        return None
    for d in st.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info
    return None


def trailing_details(exc: grpc.RpcError) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata to pass a status on unchanged (bridge relaying the utility's answer)."""
    md = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None  # type: ignore[attr-defined]
    return tuple((k, v) for k, v in (md or ()) if k == "grpc-status-details-bin")
