"""`python -m bank_sim echo-link`: the reference of `make bench-ratio`, a bare
2-hop gRPC echo of the same messages a counter pay carries.

    client ──Pay──▶ proxy (BillingService.Pay, forwards) ──Pay──▶ echo (answers a canned PayResponse)

The proxy is built the way the bridge is, minus the work: the same server
bootstrap (yindian_common.server.GrpcServer: thread pool, limits, keepalive,
health, reflection), the same server interceptors (per-RPC Prometheus
metrics), the same client path as bridge.upstream's hot unary calls (a plain
open_channel, each call counted by UnaryClientMetrics: grpcio's intercepted
channel costs the proxy ≈0.09 ms more per call) with identity metadata and a
deadline per call. The echo server is built the same way. So `pays/s ÷ echo/s`
is the share of the wire's speed a pay keeps; what is missing is the cost of
the work (journal, database).

`--aio` (role proxy, plain text only) serves and forwards with grpc.aio instead:
a measurement of whether an asyncio bridge would be cheaper (bench-ratio
`--proxy-args=--aio`). Measured on this box: no, per call it costs the same as
the thread-pool proxy (README, benchmark section).

Must never touch a database or import mis_adapter or bridge (bank_sim speaks only the wire)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

import grpc
from pydantic import Field

from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.aio_rpc import AioServerMetricsInterceptor, AioUnaryClientMetrics
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.logs import setup_logging
from yindian_common.metrics import UnaryClientMetrics, grpc_server_interceptors, start_metrics_http
from yindian_common.server import GrpcServer, channel_options, check_plaintext_allowed, open_channel, server_options
from yindian_common.settings import ServerSettings, add_settings_flags, parse_settings

log = logging.getLogger("yindian.bank_sim.echo_link")

# A counter pay's answer as mis_adapter gives it for a household with two unpaid bills.
ALLOCATIONS_IN_ECHO = 2
PAY_METHOD = "yindian.v1.BillingService/Pay"


class EchoLinkSettings(ServerSettings):
    """`python -m bank_sim echo-link`: one hop of the reference echo."""
    role: str = Field("echo", pattern="^(echo|proxy)$", description="echo: answer every Pay; proxy: forward it")
    listen: str = Field("127.0.0.1:0", description="address to serve on (HOST:PORT, port 0 picks one)")
    upstream: str = Field("", description="the echo server's address (role proxy)")
    bank_id: str = Field("ICBC", description="sent as x-yindian-bank-id on every forwarded call, as the bridge does")
    metrics_port: int = Field(0, ge=0, le=65_535, description="Prometheus endpoint (0 picks one)")
    upstream_deadline_cap_s: float = Field(5.0, gt=0, le=3_600, description="longest deadline of a forwarded call")
    aio: bool = Field(False, description="role proxy: serve and forward with grpc.aio (one event loop) instead of "
                                         "the thread-pool server and blocking calls")


def canned_response() -> pb.PayResponse:
    """A PayResponse of the size a real one has (receipt, date, two bills' allocations, balances)."""
    resp = pb.PayResponse(
        payment_id="P00000000123456", receipt_no="R20261129-0000123456", settlement_date="2026-11-29",
        allocations=[pb.Allocation(bill_id=1_000_000 + i, late_fee_fen=120, principal_fen=8_750)
                     for i in range(ALLOCATIONS_IN_ECHO)],
        arrears_after_fen=0, prepaid_after_fen=1_230)
    resp.posted_at.FromSeconds(1_795_900_000)
    return resp


class EchoServicer(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self) -> None:
        self._response = canned_response()

    def Pay(self, request: pb.PayRequest, context: grpc.ServicerContext) -> pb.PayResponse:
        resp = pb.PayResponse()
        resp.CopyFrom(self._response)  # echoes the request's key fields, as a real answer does
        resp.bank_serial, resp.account_no, resp.amount_fen = request.bank_serial, request.account_no, request.amount_fen
        return resp


class ProxyServicer(billing_pb2_grpc.BillingServiceServicer):
    """Forwards Pay as the bridge does (bridge.upstream): on a plain channel, counted by
    UnaryClientMetrics, with the remaining deadline and identity metadata; errors relayed."""

    def __init__(self, channel: grpc.Channel, bank_id: str, cap_s: float) -> None:
        self._stub = billing_pb2_grpc.BillingServiceStub(channel)
        self._metrics = UnaryClientMetrics(f"/{PAY_METHOD}")
        self._metadata = ((BANK_ID_METADATA, bank_id),)
        self._cap_s = cap_s

    def Pay(self, request: pb.PayRequest, context: grpc.ServicerContext) -> Any:
        remaining = context.time_remaining()
        timeout_s = self._cap_s if remaining is None else max(0.0, min(self._cap_s, remaining - 0.05))
        try:
            return self._metrics.call(self._stub.Pay, request, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "echo link error")  # type: ignore[attr-defined]


class AioProxyServicer(billing_pb2_grpc.BillingServiceServicer):
    """ProxyServicer as a coroutine on a grpc.aio server, forwarding through a grpc.aio channel."""

    def __init__(self, channel: grpc.aio.Channel, bank_id: str, cap_s: float) -> None:
        self._pay = channel.unary_unary(f"/{PAY_METHOD}", request_serializer=pb.PayRequest.SerializeToString,
                                        response_deserializer=pb.PayResponse.FromString)
        self._metrics = AioUnaryClientMetrics(f"/{PAY_METHOD}")
        self._metadata = ((BANK_ID_METADATA, bank_id),)
        self._cap_s = cap_s

    async def Pay(self, request: pb.PayRequest, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[override]
        remaining = context.time_remaining()
        timeout_s = self._cap_s if remaining is None else max(0.0, min(self._cap_s, remaining - 0.05))
        try:
            return await self._metrics.call(self._pay, request, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            # Not context.abort: grpc.aio's abort sends the status before it raises, so a caller could see
            # the error before the metrics interceptor had counted it. With the code set and no response,
            # the status goes out after the interceptor has recorded it, as on the thread-pool server.
            context.set_code(exc.code())  # type: ignore[attr-defined]
            context.set_details(exc.details() or "echo link error")  # type: ignore[attr-defined]
            return None


async def serve_aio_proxy(settings: EchoLinkSettings) -> None:
    limits = settings.server_limits()
    channel = grpc.aio.insecure_channel(settings.upstream, options=channel_options(settings.max_message_bytes))
    check_plaintext_allowed(settings.upstream, settings.force_insecure)
    check_plaintext_allowed(settings.listen, settings.force_insecure)
    server = grpc.aio.server(options=server_options(limits), maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
                             interceptors=[AioServerMetricsInterceptor()])
    billing_pb2_grpc.add_BillingServiceServicer_to_server(
        AioProxyServicer(channel, settings.bank_id, settings.upstream_deadline_cap_s), server)
    port = server.add_insecure_port(settings.listen)
    metrics_port = start_metrics_http(settings.metrics_host, settings.metrics_port)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = settings.listen.rsplit(":", 1)[0]
    print(f"READY echo-proxy grpc={host}:{port} metrics={metrics_port}", flush=True)
    await stop.wait()
    await server.stop(limits.grace_s)
    await channel.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim echo-link",
                                     description="One hop of the bare 2-hop gRPC echo that bench-ratio compares pays with.")
    add_settings_flags(parser, EchoLinkSettings)
    settings = parse_settings(parser, EchoLinkSettings, argv)
    setup_logging(settings.log_level, f"echo-link-{settings.role}")
    if settings.aio and settings.role == "proxy":
        if not settings.upstream:
            raise SystemExit("--upstream is required for --role proxy")
        if settings.tls() is not None or not settings.insecure:
            raise SystemExit("--aio: plain text on loopback only (a measurement reference)")
        asyncio.run(serve_aio_proxy(settings))
        return 0
    channel: grpc.Channel | None = None
    if settings.role == "proxy":
        if not settings.upstream:
            raise SystemExit("--upstream is required for --role proxy")
        channel = open_channel(settings.upstream, tls=settings.tls(), insecure=settings.insecure,
                               force_insecure=settings.force_insecure, max_message_bytes=settings.max_message_bytes)
        servicer: billing_pb2_grpc.BillingServiceServicer = ProxyServicer(
            channel, settings.bank_id, settings.upstream_deadline_cap_s)
    else:
        servicer = EchoServicer()
    server = GrpcServer(listen=settings.listen, limits=settings.server_limits(), tls=settings.tls(),
                        insecure=settings.insecure, force_insecure=settings.force_insecure,
                        interceptors=grpc_server_interceptors())
    server.add_service("yindian.v1.BillingService", billing_pb2_grpc.add_BillingServiceServicer_to_server, servicer)
    if channel is not None:
        server.on_drain(channel.close)
    metrics_port = start_metrics_http(settings.metrics_host, settings.metrics_port)
    host = settings.listen.rsplit(":", 1)[0]
    server.serve_forever(f"READY echo-{settings.role} grpc={host}:{server.port} metrics={metrics_port}")
    return 0
