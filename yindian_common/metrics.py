"""Prometheus exposition over HTTP for every process. (gRPC interceptors and
business metrics are added by the operability work.)"""
from __future__ import annotations

from prometheus_client import start_http_server


def start_metrics_http(host: str, port: int) -> int:
    """Starts the /metrics endpoint; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


def grpc_server_interceptors() -> list:  # type: ignore[type-arg]
    """Interceptors every server installs (per-RPC metrics). Filled in by the operability work."""
    return []


def instrument_channel(channel):  # type: ignore[no-untyped-def]
    """Wraps a client channel with per-RPC client metrics. Filled in by the operability work."""
    return channel
