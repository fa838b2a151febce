"""What the per-RPC metrics cost. Run as a benchmark (prints figures, asserts nothing about speed):

    .venv/bin/python -m tests.common.test_metrics_overhead [--calls N]

1. the interceptor alone: a unary handler invoked directly, bare and wrapped, in CPU microseconds per call
   (4 counter increments and 1 histogram observation; prometheus_client 0.26 takes ~1 us per inc and
   ~2 us per observe here);
2. real unary calls on loopback through a thread-pool server: plain, and with the server interceptor
   and an instrumented client channel, in calls per second and CPU microseconds per call (both ends in
   this process).

The test below runs both with few calls and checks only that the counters saw every call."""
from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from yindian_common.metrics import ServerMetricsInterceptor, grpc_server_interceptors, instrument_channel

pytestmark = pytest.mark.timeout(60)

SERVICE = "yindian.bench.Echo"


class _Details:
    method = f"/{SERVICE}/Direct"
    invocation_metadata = ()


class _Context:
    """The two things the interceptor asks of a servicer context."""

    def code(self) -> None:
        return None

    def is_active(self) -> bool:
        return True


def _echo(request: bytes, context: Any) -> bytes:
    return request


def interceptor_us_per_call(calls: int) -> tuple[float, float]:
    """(bare, wrapped) CPU microseconds per direct handler invocation."""
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    wrapped = ServerMetricsInterceptor().intercept_service(lambda _d: handler, _Details())  # type: ignore[arg-type]
    assert wrapped is not None
    ctx = _Context()

    def run(fn: Callable[[bytes, Any], bytes]) -> float:
        # CPU time, not wall time: on a shared, loaded machine wall time mostly measures the neighbours.
        start = time.process_time()
        for _ in range(calls):
            fn(b"x", ctx)
        return (time.process_time() - start) / calls * 1e6

    run(wrapped.unary_unary)  # warm: label children resolved
    return run(handler.unary_unary), run(wrapped.unary_unary)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def loopback_calls(calls: int, instrumented: bool) -> tuple[float, float]:
    """(calls per second, CPU microseconds per call) of blocking unary calls, one in flight."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=grpc_server_interceptors() if instrumented else [])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    if instrumented:
        channel = instrument_channel(channel)
    try:
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
        for _ in range(min(calls, 200)):
            echo(b"x", timeout=10)
        wall, cpu = time.perf_counter(), _cpu_s()
        for _ in range(calls):
            echo(b"x", timeout=10)
        wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
        return calls / wall, cpu / calls * 1e6
    finally:
        channel.close()
        server.stop(None).wait(5)


def test_overhead_benchmark_runs_and_counts_every_call() -> None:
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Echo", "grpc_code": "OK"}
    before = REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0
    bare_us, wrapped_us = interceptor_us_per_call(200)
    assert bare_us > 0 and wrapped_us > 0
    loopback_calls(50, instrumented=True)
    # 50 measured calls plus the warm-up's 50
    assert REGISTRY.get_sample_value("grpc_server_handled_total", labels) == before + 100
    client = REGISTRY.get_sample_value("grpc_client_handled_total", labels)
    assert client is not None and client >= 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5_000, help="unary calls per loopback run")
    args = parser.parse_args()
    bare_us, wrapped_us = interceptor_us_per_call(max(args.calls * 20, 10_000))
    print(f"interceptor, direct handler call: bare {bare_us:.2f} us, wrapped {wrapped_us:.2f} us, "
          f"metrics cost {wrapped_us - bare_us:.2f} us/call")
    rows = []
    for instrumented in (False, True, False, True):
        rate, cpu_us = loopback_calls(args.calls, instrumented)
        rows.append((instrumented, rate, cpu_us))
        print(f"loopback unary, {'server+client metrics' if instrumented else 'no metrics          '}: "
              f"{rate:8.0f} calls/s, {cpu_us:6.1f} us CPU/call (client+server)")
    plain = [r for r in rows if not r[0]]
    inst = [r for r in rows if r[0]]
    d_cpu = sum(r[2] for r in inst) / len(inst) - sum(r[2] for r in plain) / len(plain)
    print(f"metrics add {d_cpu:+.1f} us CPU per call on both ends together (mean of {len(inst)} runs each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
