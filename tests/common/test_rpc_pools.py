"""A handler given its own thread pool (rpc_pools.on_pool) keeps it through every wrapper a server
puts around handlers, and grpcio runs it there: the call's handler runs on that pool's threads."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from yindian_common.identity import AdmissionInterceptor
from yindian_common.metrics import ServerMetricsInterceptor
from yindian_common.rpc_pools import POOL_ATTR, on_pool
from yindian_common.server import GrpcServer, ServerLimits

SERVICE = "test.Pools"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"


def _ser(m: Any) -> bytes:
    return m.SerializeToString()  # type: ignore[no-any-return]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    p = ThreadPoolExecutor(max_workers=2, thread_name_prefix="own-pool")
    yield p
    p.shutdown(wait=False)


def test_a_handler_runs_on_its_own_pool_through_every_server_wrapper(pool: ThreadPoolExecutor) -> None:
    def unary(req: health_pb2.HealthCheckRequest, _ctx: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING) \
            if threading.current_thread().name.startswith("own-pool") else health_pb2.HealthCheckResponse()

    def stream(req: health_pb2.HealthCheckRequest, _ctx: grpc.ServicerContext
               ) -> Iterator[health_pb2.HealthCheckResponse]:
        yield unary(req, _ctx)

    de, ser = health_pb2.HealthCheckRequest.FromString, _ser
    handlers = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(on_pool(unary, pool), de, ser),
        "Stream": grpc.unary_stream_rpc_method_handler(on_pool(stream, pool), de, ser)})
    admission = AdmissionInterceptor(lambda _ctx, _rpc: None)
    server = GrpcServer(listen="127.0.0.1:0", limits=ServerLimits(grace_s=0.5), tls=None, insecure=True,
                        interceptors=[ServerMetricsInterceptor()], guards=[admission])
    server.grpc_server.add_generic_rpc_handlers((handlers,))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            req = health_pb2.HealthCheckRequest().SerializeToString()
            got = ch.unary_unary(UNARY, request_serializer=None, response_deserializer=None)(req, timeout=10)
            assert health_pb2.HealthCheckResponse.FromString(got).status == health_pb2.HealthCheckResponse.SERVING
            [one] = list(ch.unary_stream(STREAM, request_serializer=None, response_deserializer=None)(req, timeout=10))
            assert health_pb2.HealthCheckResponse.FromString(one).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


def test_on_pool_marks_the_handler_for_grpcio(pool: ThreadPoolExecutor) -> None:
    assert getattr(on_pool(lambda r, c: r, pool), POOL_ATTR) is pool
