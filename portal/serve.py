"""`python -m portal serve`: the customer web portal on uvicorn.

Prints `READY portal http=<host:port> metrics=<port>` once it accepts
connections; on SIGTERM stops accepting, lets requests in progress finish
within --grace-s, closes the upstream channel and exits 0."""
from __future__ import annotations

import argparse
import logging
import socket
import sys
from types import FrameType

import uvicorn

from portal.app import Portal
from portal.settings import PortalSettings
from yindian_common.logs import setup_logging
from yindian_common.metrics import start_metrics_http
from yindian_common.server import is_loopback
from yindian_common.settings import add_settings_flags, load_settings

log = logging.getLogger("portal")
KEEP_ALIVE_S = 5


def parse(argv: list[str]) -> PortalSettings:
    parser = argparse.ArgumentParser(prog="python -m portal serve",
                                     description="Serve the customer web portal: fees and consumption look-up "
                                                 "by account number and the last 4 digits of the phone.")
    add_settings_flags(parser, PortalSettings)
    args = parser.parse_args(argv)
    return load_settings(PortalSettings, args, args.config_file)


def bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    ready_line = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready_line, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # First signal drains; a second one stops at once (as every YinDian server).
        if self.should_exit:
            self.force_exit = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutdown; a clean drain exits 0 instead.
        self._captured_signals.clear()


def main(argv: list[str]) -> int:
    settings = parse(argv)
    setup_logging(settings.log_level, "portal")
    if settings.upstream_tls() is None and not settings.insecure:
        raise SystemExit("no TLS files given: pass --tls-cert/--tls-key/--tls-ca, or --insecure on loopback")
    if not 1 <= settings.overview_months <= 24:
        raise SystemExit("--overview-months must be between 1 and 24")
    if not settings.https and not settings.forwarded_allow_ips and not is_loopback(settings.listen):
        raise SystemExit(f"refusing plain HTTP on non-loopback address {settings.listen}: serve HTTPS "
                         "(--https-cert/--https-key) or name the TLS proxy in front (--forwarded-allow-ips)")
    portal = Portal(settings)
    sock = bind(settings.listen)
    host, port = sock.getsockname()[:2]
    metrics_port = start_metrics_http(settings.metrics_host, settings.metrics_port)
    config = uvicorn.Config(
        portal.asgi(), lifespan="on", log_level=settings.log_level.lower(), access_log=False,
        server_header=False, proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        limit_concurrency=settings.max_concurrent_requests, timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=max(1, int(settings.grace_s)), ssl_certfile=settings.https_cert or None,
        ssl_keyfile=settings.https_key or None)
    server = _Server(config)
    host_text = f"[{host}]" if ":" in host else host
    server.ready_line = f"READY portal http={host_text}:{port} metrics={metrics_port}"
    server.run(sockets=[sock])
    log.info("event=stopped")
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
