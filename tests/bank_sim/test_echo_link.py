"""bench-ratio's reference echo: a proxy (thread-pool, or grpc.aio with --aio) forwards Pay to the
echo server as the bridge forwards to mis_adapter, relays the upstream's errors, and records the
same per-RPC metrics series either way."""
from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import Proc, start
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc

pytestmark = pytest.mark.timeout(120)
PAY = pb.PayRequest(bank_serial="S0000000001", account_no="0000000042", amount_fen=12_345,
                    channel=pb.CHANNEL_COUNTER, outlet_code="O1", teller_id="T1")


@pytest.fixture(scope="module")
def echo() -> Iterator[Proc]:
    proc = start("echo", ["bank_sim", "echo-link", "--role", "echo", "--insecure", "--listen", "127.0.0.1:0"])
    yield proc
    proc.terminate()


def proxy_of(upstream: str, aio: bool) -> Proc:
    return start("proxy", ["bank_sim", "echo-link", "--role", "proxy", "--insecure", "--listen", "127.0.0.1:0",
                           "--upstream", upstream, *(["--aio"] if aio else [])])


def series(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize("aio", [False, True], ids=["threads", "aio"])
def test_the_proxy_forwards_a_pay_and_counts_it_on_both_sides(echo: Proc, aio: bool) -> None:
    proxy = proxy_of(echo.grpc_addr, aio)
    try:
        with grpc.insecure_channel(proxy.grpc_addr) as channel:
            stub = billing_pb2_grpc.BillingServiceStub(channel)
            answers = [stub.Pay(PAY, timeout=10) for _ in range(3)]
        assert {(a.bank_serial, a.account_no, a.amount_fen) for a in answers} == {("S0000000001", "0000000042",
                                                                                   12_345)}
        assert [len(a.allocations) for a in answers] == [2, 2, 2]
        pay = {"grpc_service": "yindian.v1.BillingService", "grpc_method": "Pay"}
        assert series(proxy.metrics_port, "grpc_server_handled_total", grpc_code="OK", **pay) == 3
        assert series(proxy.metrics_port, "grpc_client_handled_total", grpc_code="OK", **pay) == 3
        assert series(proxy.metrics_port, "grpc_server_handling_seconds_count", **pay) == 3
    finally:
        assert proxy.terminate() == 0


@pytest.mark.parametrize("aio", [False, True], ids=["threads", "aio"])
def test_the_proxy_relays_an_unreachable_upstream_as_unavailable(aio: bool) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    proxy = proxy_of(dead, aio)
    try:
        with grpc.insecure_channel(proxy.grpc_addr) as channel, pytest.raises(grpc.RpcError) as err:
            billing_pb2_grpc.BillingServiceStub(channel).Pay(PAY, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        pay = {"grpc_service": "yindian.v1.BillingService", "grpc_method": "Pay"}
        assert series(proxy.metrics_port, "grpc_server_handled_total", grpc_code="UNAVAILABLE", **pay) == 1
        assert series(proxy.metrics_port, "grpc_client_handled_total", grpc_code="UNAVAILABLE", **pay) == 1
    finally:
        assert proxy.terminate() == 0
