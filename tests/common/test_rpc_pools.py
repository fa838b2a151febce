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
from yindian_common.rpc_pools import POOL_ATTR, CallPool, on_pool
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


# ---- CallPool: grpcio's pool without concurrent.futures' bookkeeping ----
def _health_server(pool: ThreadPoolExecutor, max_concurrent_rpcs: int,
                   behaviour: Any = None) -> tuple[GrpcServer, str]:
    def unary(req: health_pb2.HealthCheckRequest, ctx: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        if behaviour is not None:
            behaviour()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING) \
            if threading.current_thread().name.startswith("call-pool") else health_pb2.HealthCheckResponse()

    handlers = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(on_pool(unary, pool), health_pb2.HealthCheckRequest.FromString,
                                                     _ser)})
    server = _started(handlers, max_concurrent_rpcs=max_concurrent_rpcs)
    return server, f"127.0.0.1:{server.port}"


def _started(handlers: grpc.GenericRpcHandler, **limits: Any) -> GrpcServer:
    """A started GrpcServer on a loopback port serving `handlers`, with the servers' metrics interceptor."""
    server = GrpcServer(listen="127.0.0.1:0", limits=ServerLimits(grace_s=0.5, **limits), tls=None, insecure=True,
                        interceptors=[ServerMetricsInterceptor()])
    server.grpc_server.add_generic_rpc_handlers((handlers,))
    server.start()
    return server


def _unary_calls_at_once(ch: grpc.Channel, calls: int) -> list[int]:
    """The statuses answered to `calls` Unary calls with distinct requests ("svc-<k>"), 6 in flight at once."""
    from concurrent.futures import ThreadPoolExecutor as Clients

    call = ch.unary_unary(UNARY, request_serializer=_ser, response_deserializer=health_pb2.HealthCheckResponse.FromString)

    def one(k: int) -> int:
        return int(call(health_pb2.HealthCheckRequest(service=f"svc-{k}"), timeout=10).status)

    with Clients(max_workers=6) as clients:
        return list(clients.map(one, range(calls)))


def test_calls_on_a_call_pool_run_there_and_free_their_place_under_the_servers_limit() -> None:
    """grpcio counts calls in progress against max_concurrent_rpcs and learns of their end from the done
    callback of what the pool's submit returned: 3 places, 20 calls one after another all answer."""
    pool = CallPool(max_workers=2, thread_name_prefix="call-pool")
    server, address = _health_server(pool, max_concurrent_rpcs=3)
    try:
        with grpc.insecure_channel(address) as ch:
            call = ch.unary_unary(UNARY, request_serializer=None, response_deserializer=None)
            req = health_pb2.HealthCheckRequest().SerializeToString()
            for _ in range(20):
                got = health_pb2.HealthCheckResponse.FromString(call(req, timeout=10))
                assert got.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()
        pool.shutdown(wait=True)


def test_a_call_pool_runs_at_most_max_workers_calls_at_once_and_every_call_once() -> None:
    pool = CallPool(max_workers=3, thread_name_prefix="call-pool")
    lock, running, peak, ran = threading.Lock(), [0], [0], []
    release = threading.Event()
    done: list[Any] = []

    def work(k: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
            ran.append(k)

    calls = [pool.submit(work, k) for k in range(10)]
    for c in calls:
        c.add_done_callback(done.append)
    release.set()
    pool.shutdown(wait=True)
    assert sorted(ran) == list(range(10)) and peak[0] == 3
    assert len(done) == 10 and all(c.done() for c in calls)
    late: list[Any] = []
    calls[0].add_done_callback(late.append)  # added after the end: called at once
    assert late == [calls[0]]
    with pytest.raises(RuntimeError):
        pool.submit(work, 99)


def test_shutdown_with_cancel_drops_the_calls_not_started_and_ends_them() -> None:
    pool = CallPool(max_workers=1, thread_name_prefix="call-pool")
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def work(k: int) -> None:
        started.set()
        release.wait(10)
        ran.append(k)

    calls = [pool.submit(work, k) for k in range(4)]
    ended: list[Any] = []
    for c in calls:
        c.add_done_callback(ended.append)
    assert started.wait(10)
    pool.shutdown(wait=False, cancel_futures=True)
    assert len(ended) == 3  # the three queued calls, ended without running
    release.set()
    pool.shutdown(wait=True)  # joins the worker, which ends the call it had started
    assert ran == [0] and len(ended) == 4


def test_a_unary_call_on_a_call_pool_is_handed_to_its_worker_once_with_its_request() -> None:
    """The pool receives each unary call's request on grpcio's serving thread and hands the call to a
    worker only then (rpc_pools._receive_first): with the installed grpcio every call takes that path,
    and each handler gets its own request, under concurrency too."""
    from yindian_common import rpc_pools

    pool = CallPool(max_workers=3, thread_name_prefix="call-pool")

    def unary(req: health_pb2.HealthCheckRequest, _ctx: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        ok = threading.current_thread().name.startswith("call-pool") and req.service.startswith("svc-")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if ok else
                                              health_pb2.HealthCheckResponse.NOT_SERVING)

    handlers = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(on_pool(unary, pool), health_pb2.HealthCheckRequest.FromString,
                                                     _ser)})
    server = _started(handlers, max_concurrent_rpcs=8)
    before = rpc_pools.received_first
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            answers = _unary_calls_at_once(ch, 60)
    finally:
        server.stop()
        pool.shutdown(wait=True)
    assert answers == [health_pb2.HealthCheckResponse.SERVING] * 60
    assert rpc_pools.received_first - before == 60


def test_a_unary_call_without_its_request_message_is_answered_as_grpcio_answers_and_frees_its_place() -> None:
    """A client that ends its side without sending the request (a streaming client on a unary method)
    gets UNIMPLEMENTED "requires exactly one request message", as from grpcio's own path, and the call's
    place under max_concurrent_rpcs is freed: the calls after it are answered."""
    pool = CallPool(max_workers=2, thread_name_prefix="call-pool")
    server, address = _health_server(pool, max_concurrent_rpcs=2)
    try:
        with grpc.insecure_channel(address) as ch:
            empty = ch.stream_unary(UNARY, request_serializer=None, response_deserializer=None)
            for _ in range(4):
                with pytest.raises(grpc.RpcError) as err:
                    empty(iter(()), timeout=10)
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
                assert "requires exactly one request message" in (err.value.details() or "")
            call = ch.unary_unary(UNARY, request_serializer=None, response_deserializer=None)
            req = health_pb2.HealthCheckRequest().SerializeToString()
            for _ in range(4):
                got = health_pb2.HealthCheckResponse.FromString(call(req, timeout=10))
                assert got.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()
        pool.shutdown(wait=True)


def test_every_server_hands_a_unary_call_to_its_thread_once_with_its_request() -> None:
    """GrpcServer's own threads are a CallPool: a handler with no pool of its own gets each unary call
    once its request has arrived (one hand-off), on the server's "rpc" threads, each with its own request;
    a streaming call takes the pool's queue as before and is answered too."""
    from yindian_common import rpc_pools

    def unary(req: health_pb2.HealthCheckRequest, _ctx: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        ok = threading.current_thread().name.startswith("rpc_") and req.service.startswith("svc-")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if ok else
                                              health_pb2.HealthCheckResponse.NOT_SERVING)

    def stream(reqs: Iterator[health_pb2.HealthCheckRequest], _ctx: grpc.ServicerContext
               ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if len(list(reqs)) == 3
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    handlers = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, health_pb2.HealthCheckRequest.FromString, _ser),
        "Stream": grpc.stream_unary_rpc_method_handler(stream, health_pb2.HealthCheckRequest.FromString, _ser)})
    server = _started(handlers, max_concurrent_rpcs=8, max_workers=3)
    before = rpc_pools.received_first
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            answers = _unary_calls_at_once(ch, 40)
            streamed = ch.stream_unary(STREAM, request_serializer=_ser,
                                       response_deserializer=health_pb2.HealthCheckResponse.FromString)
            got = streamed(iter([health_pb2.HealthCheckRequest()] * 3), timeout=10)
    finally:
        server.stop()
    assert answers == [health_pb2.HealthCheckResponse.SERVING] * 40
    assert got.status == health_pb2.HealthCheckResponse.SERVING
    assert rpc_pools.received_first - before == 40
