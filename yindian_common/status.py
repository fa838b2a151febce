"""The edge between domain errors and gRPC statuses: servers abort with a
status carrying google.rpc.ErrorInfo (stable reason, field); clients read it."""
from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from yindian_common.errors import YinDianError

DOMAIN = "yindian"


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
