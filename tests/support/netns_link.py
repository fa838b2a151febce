"""A TCP path to a loopback server across a real network link that a test can blackhole.

The fault proxy (yindian_common.fault_proxy) blackholes in user space: its kernel still
acknowledges every segment, so the client's TCP never notices anything wrong. A link that
dies (a cable, a firewall that drops a flow, a host that lost power) acknowledges nothing.
This helper makes one: a network namespace joined to ours by a veth pair, a listening
socket inside the namespace, and a forwarder (threads in our namespace) to the upstream
server on 127.0.0.1. A client connects to `address` (the namespace's side of the pair);
`blackhole()` takes the namespace's address away, so that every segment either way is
silently dropped while both sockets stay open (or, with `answers_only`, adds a blackhole route
for what the namespace sends); `heal()` puts it back and TCP's retransmissions resume the
streams.

Needs root and `ip` (iproute2): true in CI (`.ci/run` runs as root), where its absence
fails the test; elsewhere the test skips with the reason."""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.support.databases import IN_CI

CLONE_NEWNET = 0x40000000
IP_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
CONNECTIONS_MAX = 64
READ_BYTES_MAX = 65_536
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
_seq = iter(range(1, 1_000_000))
_seq_lock = threading.Lock()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=IP_TIMEOUT_S, capture_output=True)


def netns_unavailable() -> str | None:
    """Why this machine cannot make such a link, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, routes)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return None


def _listen_in(netns: str, host: str) -> socket.socket:
    """A listening socket made inside `netns` (by a thread that joins it; the socket keeps it)."""
    made: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            made.append(socket.create_server((host, 0), backlog=CONNECTIONS_MAX))
        except BaseException as exc:
            made.append(exc)

    t = threading.Thread(target=run, name="netns-listen")
    t.start()
    t.join(IP_TIMEOUT_S)
    if not made:
        raise RuntimeError("could not open a socket in the namespace")
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class NetnsLink:
    """`address` ("10.213.K.2:PORT") reaches `upstream` ("127.0.0.1:PORT") across a veth pair."""

    def __init__(self, upstream: str) -> None:
        with _seq_lock:
            n = next(_seq)
        tag = f"{os.getpid() % 100_000}x{n}"
        self._ns = f"ydl{tag}"
        self._host_if = f"ydh{tag}"[:15]
        self._ns_if = f"ydn{tag}"[:15]
        k = (os.getpid() * 7 + n) % 250 + 1
        self._host_ip, self._ns_ip = f"10.213.{k}.1", f"10.213.{k}.2"
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._closed = threading.Event()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._dark = ""
        self._listener: socket.socket | None = None
        self.address = ""

    def start(self) -> NetnsLink:
        _ip("netns", "add", self._ns)
        try:
            _ip("link", "add", self._host_if, "type", "veth", "peer", "name", self._ns_if)
            _ip("link", "set", self._ns_if, "netns", self._ns)
            _ip("addr", "add", f"{self._host_ip}/30", "dev", self._host_if)
            _ip("link", "set", self._host_if, "up")
            _ip("-n", self._ns, "addr", "add", f"{self._ns_ip}/30", "dev", self._ns_if)
            _ip("-n", self._ns, "link", "set", self._ns_if, "up")
            _ip("-n", self._ns, "link", "set", "lo", "up")
            self._listener = _listen_in(self._ns, self._ns_ip)
        except BaseException:
            self.close()
            raise
        self.address = f"{self._ns_ip}:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="netns-accept", daemon=True).start()
        return self

    def blackhole(self, *, answers_only: bool = False) -> None:
        """Every segment between the client and the namespace is dropped from now on (the namespace's
        address is taken away: new connections' SYNs go unanswered too). `answers_only`: only what
        the namespace sends (answers, acknowledgements) is dropped, so a request sent now still
        reaches the server, which acts on it, and its answer is lost."""
        if answers_only:
            _ip("-n", self._ns, "route", "add", "blackhole", f"{self._host_ip}/32")
        else:
            _ip("-n", self._ns, "addr", "del", f"{self._ns_ip}/30", "dev", self._ns_if)
        self._dark = "answers" if answers_only else "both"

    def heal(self) -> None:
        if self._dark == "answers":
            _ip("-n", self._ns, "route", "del", "blackhole", f"{self._host_ip}/32")
        elif self._dark == "both":
            _ip("-n", self._ns, "addr", "add", f"{self._ns_ip}/30", "dev", self._ns_if)
        self._dark = ""

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:  # shutdown first: a close alone leaves a thread blocked in recv, and sends no FIN
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        with contextlib.suppress(Exception):
            self.heal()
        # Deleting the namespace deletes its end of the pair, and with it ours.
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("netns", "del", self._ns)
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("link", "del", self._host_if)

    def __enter__(self) -> NetnsLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if len(self._socks) >= 2 * CONNECTIONS_MAX:
                    client.close()
                    continue
            try:
                server = socket.create_connection(self._upstream, timeout=CONNECT_TIMEOUT_S)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._socks.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), name="netns-pipe", daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(READ_BYTES_MAX):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._socks.discard(src)


@contextlib.contextmanager
def netns_link(upstream: str) -> Iterator[NetnsLink]:
    """A started link to `upstream`, or skip (fail with CI=true) where this machine cannot make one."""
    why = netns_unavailable()
    if why is not None:
        if IN_CI:
            pytest.fail(f"a blackholed-link test {why}, and CI=true requires it")
        pytest.skip(f"a blackholed-link test {why}")
    with NetnsLink(upstream) as link:
        yield link


@contextlib.contextmanager
def database_link(url: str) -> Iterator[tuple[NetnsLink, str]]:
    """A link to the server of database `url` (as `netns_link`), and the URL that reaches that database
    across it."""
    u = sa.make_url(url)
    with netns_link(f"{u.host}:{u.port or DEFAULT_PORTS[u.get_backend_name()]}") as link:
        host, port = link.address.rsplit(":", 1)
        yield link, u.set(host=host, port=int(port)).render_as_string(hide_password=False)
