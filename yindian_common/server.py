"""gRPC server and channel bootstrap shared by every YinDian server:
thread-pool server (BASELINES.md: cheaper than grpc.aio for unary calls),
bounded concurrent RPCs and message sizes, keepalive on both ends, health
and reflection, mTLS or loopback-only plain text, Prometheus endpoint, and
two-stage shutdown (first SIGTERM/SIGINT drains within a grace period,
a second one exits at once)."""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from yindian_common.rpc_pools import CallPool
from yindian_common.tls import CertificateStore, TlsFiles
from yindian_common.wire_guard import MalformedRequestInterceptor

log = logging.getLogger("yindian.server")

# Keepalive: a dead peer is noticed within ping interval + timeout.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
MIN_PING_INTERVAL_MS = 5_000


@dataclass(frozen=True)
class ServerLimits:
    max_workers: int = 64
    max_concurrent_rpcs: int = 256
    max_message_bytes: int = 4 * 1024 * 1024
    grace_s: float = 10.0


def is_loopback(host_port: str) -> bool:
    host = host_port.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext_allowed(address: str, force: bool) -> None:
    if not is_loopback(address) and not force:
        raise SystemExit(f"refusing plain text on non-loopback address {address}: "
                         "use --tls-cert/--tls-key/--tls-ca or force it explicitly")


def server_options(limits: ServerLimits) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


def channel_options(max_message_bytes: int = 4 * 1024 * 1024) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
    ]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def open_channel(target: str, *, tls: TlsFiles | None, insecure: bool, force_insecure: bool = False,
                 max_message_bytes: int = 4 * 1024 * 1024) -> grpc.Channel:
    opts = channel_options(max_message_bytes)
    if tls is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(tls.ca), private_key=_read(tls.key),
                                             certificate_chain=_read(tls.cert))
        return grpc.secure_channel(target, creds, options=opts)
    if not insecure:
        raise SystemExit("no TLS files given: pass --tls-cert/--tls-key/--tls-ca, or --insecure on loopback")
    check_plaintext_allowed(target, force_insecure)
    return grpc.insecure_channel(target, options=opts)


class GrpcServer:
    """One process's gRPC server with health, reflection and graceful drain."""

    def __init__(self, *, listen: str, limits: ServerLimits, tls: TlsFiles | None, insecure: bool,
                 force_insecure: bool = False,
                 interceptors: Sequence[grpc.ServerInterceptor] = (),
                 cert_store: CertificateStore | None = None,
                 guards: Sequence[grpc.ServerInterceptor] = ()) -> None:
        self.limits = limits
        # With TLS, the certificates (and the revoked client serials) reload on SIGHUP and when the files change.
        self.cert_store = cert_store if cert_store is not None or tls is None else CertificateStore(tls)
        # Revoked certificates are refused first, then the server's own admission `guards`.
        revocation = [self.cert_store.interceptor()] if self.cert_store is not None else []
        # The server's threads: a CallPool, which hands a unary call to its thread once, with its request
        # (rpc_pools: grpcio's own pool wakes the thread at the call's arrival and again with its message).
        # Session 16, bench-ratio on PostgreSQL, interleaved pairs: CPU per call / the same run's client
        # -5 to -7 % in the bridge and in the echo's proxy, lower in every pair (README, benchmark section).
        self._server = grpc.server(
            CallPool(max_workers=limits.max_workers, thread_name_prefix="rpc"),
            options=server_options(limits), maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
            interceptors=[*interceptors, *revocation, *guards, MalformedRequestInterceptor()])  # innermost
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        if self.cert_store is not None:
            self.port = self._server.add_secure_port(listen, self.cert_store.server_credentials())
        else:
            if not insecure:
                raise SystemExit("no TLS files given: pass --tls-cert/--tls-key/--tls-ca, or --insecure on loopback")
            check_plaintext_allowed(listen, force_insecure)
            self.port = self._server.add_insecure_port(listen)
        if self.port == 0:
            raise SystemExit(f"cannot listen on {listen}")
        self._stopping = threading.Event()
        self._on_drain: list[Callable[[], None]] = []

    @property
    def grpc_server(self) -> grpc.Server:
        return self._server

    def add_service(self, full_name: str, adder: Callable[[Any, grpc.Server], None], servicer: Any) -> None:
        adder(servicer, self._server)
        self._service_names.append(full_name)

    def on_drain(self, fn: Callable[[], None]) -> None:
        """Called once in-flight calls have drained (flush, close pools)."""
        self._on_drain.append(fn)

    def start(self) -> None:
        reflection.enable_server_reflection(self._service_names, self._server)
        self._server.start()
        for name in self._service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def set_serving(self, serving: bool) -> None:
        """Every service's health (NOT_SERVING e.g. while the database is unreachable);
        ignored once the drain has begun."""
        if self._stopping.is_set():
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._service_names:
            self.health.set(name, status)
        self.health.set("", status)

    def stop(self) -> None:
        """Stage one: NOT_SERVING, refuse new calls, drain in-flight ones."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        done = self._server.stop(self.limits.grace_s)
        done.wait(self.limits.grace_s + 1)
        for fn in self._on_drain:
            fn()

    def serve_forever(self, ready_line: str | None = None) -> None:
        """Blocks until a signal; prints `ready_line` (with the port) once serving."""
        got_signal = threading.Event()
        reload_asked = threading.Event()

        def handler(signum: int, _frame: Any) -> None:
            if got_signal.is_set():
                log.warning("event=second_signal action=exit_now")
                os._exit(1)
            got_signal.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, lambda _signum, _frame: reload_asked.set())
        self.start()
        if ready_line:
            print(ready_line, flush=True)
        while not got_signal.wait(0.5):
            if reload_asked.is_set():
                reload_asked.clear()
                if self.cert_store is not None:
                    self.cert_store.reload()
        log.info("event=draining grace_s=%s", self.limits.grace_s)
        self.stop()
        log.info("event=stopped")
