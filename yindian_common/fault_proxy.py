"""A small fault-injecting TCP proxy (this machine has no netem or toxiproxy):
put it between the bridge and mis_adapter, or between mis_adapter and its
database, and break the link on command.

Modes (one at a time, for every connection through the proxy):

- `pass`      forward bytes as they come;
- `delay S`   hold each chunk S seconds before forwarding it (order kept);
- `blackhole` forward nothing and stop reading, in both directions, on open
              and new connections, until the mode changes; bytes held are then
              delivered in order (packets dropped on a wire are retransmitted by
              TCP, so a heal resumes the stream) unless the peer gave up first;
- `reset`     abort every open connection with a TCP RST, and every new one
              while the mode holds;
- `cut N`     forward N more bytes (both directions together), then abort the
              connection that crossed the budget with a RST; one-shot: the mode
              goes back to `pass`.

Duplicate-free and loss-free by construction: a byte is read once and
written at most once, in order, and a connection whose bytes cannot all be
delivered is torn down, never resumed with a gap. The proxy never parses
what it carries.

Control: the Python API (`FaultProxy`, started in its own thread with
`with FaultProxy(upstream) as proxy:`), or, when the proxy runs as its own
process (`python -m yindian_common.fault_proxy --upstream H:P`), a line
protocol on a control port: `pass`, `delay 0.5`, `blackhole`, `reset`,
`cut 100`, `stats` (one JSON line back), each answered `OK ...` or `ERR ...`.
`FaultProxyControl` is the client."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

READ_BYTES_MAX = 65_536            # one read from either side
CONNECT_TIMEOUT_S = 5.0            # opening the upstream connection
CONNECTIONS_MAX = 1_024            # open proxied connections; more are refused (RST)
CONTROL_LINE_BYTES_MAX = 256       # one control command
CONTROL_TIMEOUT_S = 5.0            # a control round trip
DELAY_S_MAX = 600.0
START_TIMEOUT_S = 10.0

MODES = ("pass", "delay", "blackhole", "reset", "cut")


class FaultProxyError(Exception):
    """A bad control command or a proxy that would not start."""


@dataclass
class ProxyStats:
    connections: int = 0
    open_connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    resets: int = 0
    cuts: int = 0
    refused: int = 0
    faults: dict[str, int] = field(default_factory=dict)  # mode -> times it was set

    def as_dict(self) -> dict[str, Any]:
        return {"connections": self.connections, "open_connections": self.open_connections,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "resets": self.resets,
                "cuts": self.cuts, "refused": self.refused, "faults": dict(self.faults)}


def _split_hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise FaultProxyError(f"address {addr!r} is not HOST:PORT")
    return host, int(port)


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Conn:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.dead = False
        # The cut's budget is spent: nothing more crosses, in either direction, while its last bytes drain.
        self.cut = False

    def abort(self) -> None:
        if self.dead:
            return
        self.dead = True
        _abort_with_rst(self.client)
        if self.upstream is not None:
            _abort_with_rst(self.upstream)


class FaultProxy:
    """The proxy. All state lives on its event loop; the public methods may be
    called from any thread once started."""

    def __init__(self, upstream: str, listen: str = "127.0.0.1:0", *, control: str | None = None) -> None:
        self._upstream = _split_hostport(upstream)
        self._listen = _split_hostport(listen)
        self._control_listen = _split_hostport(control) if control else None
        self.stats = ProxyStats()
        self._mode = "pass"
        self._delay_s = 0.0
        self._cut_left = 0
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        self._control_server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self.port = 0
        self.control_port = 0

    # ---- addresses ----
    @property
    def address(self) -> str:
        return f"{self._listen[0]}:{self.port}"

    @property
    def control_address(self) -> str:
        return f"{self._control_listen[0] if self._control_listen else ''}:{self.control_port}"

    # ---- lifecycle ----
    async def start_async(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self._listen[0], self._listen[1],
                                                  limit=READ_BYTES_MAX)
        self.port = self._server.sockets[0].getsockname()[1]
        if self._control_listen is not None:
            self._control_server = await asyncio.start_server(self._control, *self._control_listen)
            self.control_port = self._control_server.sockets[0].getsockname()[1]

    async def stop_async(self) -> None:
        for srv in (self._server, self._control_server):
            if srv is not None:
                srv.close()
        for conn in list(self._conns):
            conn.abort()
        for srv in (self._server, self._control_server):
            if srv is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(srv.wait_closed(), 2.0)
        if self._stopped is not None:
            self._stopped.set()

    async def serve_until_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    def start(self) -> FaultProxy:
        """Run the proxy on its own event loop in a daemon thread."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            async def main() -> None:
                try:
                    await self.start_async()
                except BaseException as exc:  # reported to the starting thread
                    failure.append(exc)
                    ready.set()
                    return
                ready.set()
                await self.serve_until_stopped()
            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S) or failure:
            raise FaultProxyError(f"fault proxy did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            asyncio.run_coroutine_threadsafe(self.stop_async(), self._loop).result(START_TIMEOUT_S)
        self._thread.join(START_TIMEOUT_S)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the faults (thread-safe) ----
    def set_mode(self, mode: str, arg: float = 0.0) -> None:
        """`pass`, `delay` (arg seconds), `blackhole`, `reset`, `cut` (arg bytes)."""
        self._validate(mode, arg)
        self._call(self._apply_mode, mode, arg)

    def heal(self) -> None:
        self.set_mode("pass")

    def delay(self, seconds: float) -> None:
        self.set_mode("delay", seconds)

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def reset(self) -> None:
        self.set_mode("reset")

    def cut_after(self, n_bytes: int) -> None:
        self.set_mode("cut", n_bytes)

    def snapshot(self) -> dict[str, Any]:
        return self._call(lambda: {**self.stats.as_dict(), "mode": self._mode})

    @staticmethod
    def _validate(mode: str, arg: float) -> None:
        if mode not in MODES:
            raise FaultProxyError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if mode == "delay" and not 0.0 <= arg <= DELAY_S_MAX:
            raise FaultProxyError(f"delay must be 0..{DELAY_S_MAX} s")
        if mode == "cut" and (arg < 0 or arg != int(arg)):
            raise FaultProxyError("cut takes a whole number of bytes ≥ 0")

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._loop is None:
            raise FaultProxyError("fault proxy not started")
        if self._thread is None or threading.current_thread() is self._thread:
            return fn(*args)

        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(CONTROL_TIMEOUT_S)

    def _apply_mode(self, mode: str, arg: float) -> None:
        assert self._flowing is not None
        self.stats.faults[mode] = self.stats.faults.get(mode, 0) + 1
        self._mode = mode
        self._delay_s = float(arg) if mode == "delay" else 0.0
        self._cut_left = int(arg) if mode == "cut" else 0
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "reset":
            for conn in list(self._conns):
                self.stats.resets += 1
                conn.abort()

    # ---- the data path ----
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self.stats.connections += 1
        if self._mode == "reset" or len(self._conns) >= CONNECTIONS_MAX:
            self.stats.resets += self._mode == "reset"
            self.stats.refused += self._mode != "reset"
            conn.abort()
            return
        self._conns.add(conn)
        self.stats.open_connections = len(self._conns)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self._upstream, limit=READ_BYTES_MAX), CONNECT_TIMEOUT_S)
            except (TimeoutError, OSError):
                self.stats.refused += 1
                conn.abort()
                return
            conn.upstream = up_writer
            if conn.dead:  # reset while connecting
                _abort_with_rst(up_writer)
                return
            await asyncio.gather(self._pipe(conn, reader, up_writer, "up"),
                                 self._pipe(conn, up_reader, writer, "down"))
        finally:
            self._conns.discard(conn)
            self.stats.open_connections = len(self._conns)
            if not conn.dead:
                for w in (writer, conn.upstream):
                    if w is not None:
                        w.close()

    async def _pipe(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        assert self._flowing is not None
        try:
            while not conn.dead:
                await self._flowing.wait()  # blackhole: stop reading, TCP back-pressure does the rest
                data = await reader.read(READ_BYTES_MAX)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                await self._flowing.wait()
                if self._delay_s > 0:
                    await asyncio.sleep(self._delay_s)
                if conn.dead or conn.cut:
                    return
                if self._mode == "cut":
                    if len(data) >= self._cut_left:
                        writer.write(data[:self._cut_left])
                        self._count(direction, self._cut_left)
                        self._mode, self._cut_left = "pass", 0
                        self.stats.cuts += 1
                        conn.cut = True
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(writer.drain(), 1.0)
                        conn.abort()
                        return
                    self._cut_left -= len(data)
                writer.write(data)
                self._count(direction, len(data))
                await writer.drain()
        except (ConnectionError, OSError):
            conn.abort()

    def _count(self, direction: str, n: int) -> None:
        if direction == "up":
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n

    # ---- the control channel ----
    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                writer.write((self._command(line) + "\n").encode())
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    def _command(self, raw: bytes) -> str:
        if len(raw) > CONTROL_LINE_BYTES_MAX:
            return "ERR command too long"
        words = raw.decode("ascii", "replace").split()
        if not words:
            return "ERR empty command"
        if words[0] == "stats":
            return "OK " + json.dumps({**self.stats.as_dict(), "mode": self._mode})
        try:
            arg = float(words[1]) if len(words) > 1 else 0.0
            self._validate(words[0], arg)
        except (ValueError, FaultProxyError) as exc:
            return f"ERR {exc}"
        self._apply_mode(words[0], arg)
        return f"OK {words[0]}"


class FaultProxyControl:
    """The client of a proxy running in another process."""

    def __init__(self, control_address: str) -> None:
        self._addr = _split_hostport(control_address)

    def send(self, command: str) -> str:
        with socket.create_connection(self._addr, timeout=CONTROL_TIMEOUT_S) as sock:
            sock.sendall(command.encode("ascii") + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
        answer = buf.decode().strip()
        if not answer.startswith("OK"):
            raise FaultProxyError(f"{command!r}: {answer or 'no answer'}")
        return answer[3:]

    def stats(self) -> dict[str, Any]:
        return json.loads(self.send("stats"))  # type: ignore[no-any-return]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m yindian_common.fault_proxy",
                                     description="A fault-injecting TCP proxy with a line control port.")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on (port 0 picks one)")
    parser.add_argument("--control", default="127.0.0.1:0", help="HOST:PORT of the control port")
    args = parser.parse_args(argv)
    proxy = FaultProxy(args.upstream, args.listen, control=args.control)

    async def run() -> None:
        await proxy.start_async()
        print(f"READY fault_proxy listen={proxy.address} control={proxy.control_address}", flush=True)
        await proxy.serve_until_stopped()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
