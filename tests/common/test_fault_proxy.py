"""The fault proxy: bytes pass intact; delay, blackhole, reset and cut do
what they say, on open and new connections; the control port drives a proxy
running as its own process; PostgreSQL and a gRPC server work through it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa

from tests.support.databases import fresh_database
from tests.support.procs import REPO
from yindian_common.db import make_engine
from yindian_common.fault_proxy import FaultProxy, FaultProxyControl, FaultProxyError

pytestmark = pytest.mark.timeout(60)
RECV_TIMEOUT_S = 5.0


class EchoServer:
    """Echoes every byte back and keeps what it received, per connection."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self.received: list[bytearray] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            buf = bytearray()
            self.received.append(buf)
            threading.Thread(target=self._serve, args=(conn, buf), daemon=True).start()

    def _serve(self, conn: socket.socket, buf: bytearray) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                buf.extend(data)
                try:
                    conn.sendall(data)
                except OSError:
                    break
        self.closed.set()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    e = EchoServer()
    yield e
    e.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.address) as p:
        yield p


def connect(proxy: FaultProxy) -> socket.socket:
    host, port = proxy.address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=RECV_TIMEOUT_S)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_bytes_pass_intact_both_ways(proxy: FaultProxy) -> None:
    payload = os.urandom(1_000_000)
    with connect(proxy) as s:
        threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
        assert recv_exactly(s, len(payload)) == payload
    stats = proxy.snapshot()
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload)


def test_delay_holds_each_chunk(proxy: FaultProxy) -> None:
    proxy.delay(0.3)
    with connect(proxy) as s:
        t0 = time.monotonic()
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        assert time.monotonic() - t0 >= 0.6  # held once each way
    proxy.heal()
    with connect(proxy) as s:
        t0 = time.monotonic()
        s.sendall(b"pong")
        assert recv_exactly(s, 4) == b"pong"
        assert time.monotonic() - t0 < 0.3


def test_blackhole_holds_bytes_and_heal_delivers_them_in_order(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as s:
        s.sendall(b"before")
        assert recv_exactly(s, 6) == b"before"
        proxy.blackhole()
        s.sendall(b"-held-")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(10)
        assert bytes(echo.received[0]) == b"before"  # nothing crossed
        proxy.heal()
        s.settimeout(RECV_TIMEOUT_S)
        assert recv_exactly(s, 6) == b"-held-"
        assert bytes(echo.received[0]) == b"before-held-"  # no gap, no duplicate


def test_blackhole_applies_to_new_connections(proxy: FaultProxy) -> None:
    proxy.blackhole()
    with connect(proxy) as s:
        s.sendall(b"x")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(1)


def test_reset_aborts_open_and_new_connections(proxy: FaultProxy) -> None:
    with connect(proxy) as s:
        s.sendall(b"a")
        assert recv_exactly(s, 1) == b"a"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            s.sendall(b"b")
            s.recv(1)
    with pytest.raises((ConnectionResetError, BrokenPipeError)), connect(proxy) as s2:  # refused at once
        s2.sendall(b"c")
        if s2.recv(1) == b"":
            raise ConnectionResetError("closed")
    proxy.heal()
    with connect(proxy) as s3:
        s3.sendall(b"d")
        assert recv_exactly(s3, 1) == b"d"
    assert proxy.snapshot()["resets"] >= 2


def test_cut_after_n_bytes_forwards_exactly_n_then_resets(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.cut_after(100)
    with connect(proxy) as s:
        s.sendall(b"x" * 1_000)
        got = b""
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionResetError("closed")
                got += chunk
    assert echo.closed.wait(RECV_TIMEOUT_S)
    stats = proxy.snapshot()
    # exactly 100 bytes crossed, both directions together (the echo may have answered part of them)
    assert stats["bytes_up"] + stats["bytes_down"] == 100
    assert len(echo.received[0]) == stats["bytes_up"] and len(got) <= stats["bytes_down"]
    assert stats["cuts"] == 1 and stats["mode"] == "pass"  # one-shot
    with connect(proxy) as s2:
        s2.sendall(b"ok")
        assert recv_exactly(s2, 2) == b"ok"


def test_bad_commands_are_refused() -> None:
    p = FaultProxy("127.0.0.1:9")
    with pytest.raises(FaultProxyError):
        p.set_mode("melt")
    with pytest.raises(FaultProxyError):
        p.set_mode("delay", -1)
    with pytest.raises(FaultProxyError):
        FaultProxy("nonsense")


def test_control_port_drives_a_proxy_process(echo: EchoServer) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "yindian_common.fault_proxy", "--upstream", echo.address],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY fault_proxy"), line
        fields = dict(w.split("=", 1) for w in line.split()[2:])
        ctl = FaultProxyControl(fields["control"])
        host, port = fields["listen"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=RECV_TIMEOUT_S) as s:
            s.sendall(b"hi")
            assert recv_exactly(s, 2) == b"hi"
            ctl.send("reset")
            with pytest.raises(ConnectionResetError):
                s.sendall(b"again")
                s.recv(1)
        with pytest.raises(FaultProxyError, match="unknown mode"):
            ctl.send("explode")
        ctl.send("pass")
        stats = ctl.stats()
        assert stats["resets"] >= 1 and stats["faults"]["reset"] == 1 and stats["mode"] == "pass"
    finally:
        proc.terminate()
        proc.wait(10)


def test_postgresql_through_the_proxy_fails_on_reset_and_recovers(tmp_path: object) -> None:
    with fresh_database("postgresql", tmp_path, "proxy") as url, FaultProxy("127.0.0.1:5432") as p:  # type: ignore[arg-type]
        eng = make_engine(url.replace("127.0.0.1:5432", p.address), pool_size=1)
        try:
            with eng.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
                p.reset()
                with pytest.raises(sa.exc.OperationalError):
                    conn.execute(sa.text("SELECT 2"))
            p.heal()
            with eng.connect() as conn:
                assert conn.execute(sa.text("SELECT 3")).scalar_one() == 3
        finally:
            eng.dispose()


def test_grpc_through_the_proxy_sees_deadline_and_unavailable(sqlite_url: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.support.mis_data import running_adapter
    with running_adapter(sqlite_url) as adapter, FaultProxy(adapter.address) as p, \
            grpc.insecure_channel(p.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        p.blackhole()
        with pytest.raises(grpc.RpcError) as exc:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        p.reset()
        with pytest.raises(grpc.RpcError) as exc:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        p.heal()
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True).status == 1
