"""A TCP proxy for the bridge's link that reads HTTP/2 frame boundaries, so a
test can break the link at an exact point of one call, deterministically:

- `cut_before_request()`: the next request's HEADERS frame is not forwarded;
  the connection is closed. The utility never sees the call.
- `cut_after_response()`: the next response's HEADERS frame (sent by a gRPC
  server once the handler returned, i.e. after the utility committed) is not
  forwarded; the connection is closed. The call was applied, its answer lost.
- `hold_next_request()`: the next request waits at the proxy until `release()`.

Each one is one-shot. `requests` counts requests that crossed the proxy."""
from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
HEADERS = 0x1
READ_BYTES = 65536
WAIT_S = 30.0


class Link:
    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._mode = ""
        self.requests = 0
        self.fired = threading.Event()
        self.held = threading.Event()
        self._release = threading.Event()
        self._closed = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    # ---- arming ----
    def _arm(self, mode: str) -> None:
        with self._lock:
            self._mode = mode
            self.fired.clear()
            self.held.clear()
            self._release.clear()

    def cut_before_request(self) -> None:
        self._arm("cut_before_request")

    def cut_after_response(self) -> None:
        self._arm("cut_after_response")

    def hold_next_request(self) -> None:
        self._arm("hold")

    def release(self) -> None:
        self._release.set()

    def _take(self, mode: str) -> bool:
        with self._lock:
            if self._mode == mode:
                self._mode = ""
                return True
            return False

    # ---- plumbing ----
    def close(self) -> None:
        self._closed = True
        self._release.set()
        self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            _close(s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._socks += [client, server]

            def cut(c: socket.socket = client, s: socket.socket = server) -> None:
                _close(c)
                _close(s)

            threading.Thread(target=self._pipe, args=(client, server, True, cut), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False, cut), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, to_server: bool, cut: Callable[[], None]) -> None:
        buf = b""
        preface_left = len(PREFACE) if to_server else 0
        try:
            while True:
                data = src.recv(READ_BYTES)
                if not data:
                    break
                buf += data
                out = b""
                if preface_left:
                    n = min(preface_left, len(buf))
                    out, buf, preface_left = buf[:n], buf[n:], preface_left - n
                while len(buf) >= FRAME_HEADER:
                    size = int.from_bytes(buf[:3], "big")
                    if len(buf) < FRAME_HEADER + size:
                        break
                    frame, buf = buf[:FRAME_HEADER + size], buf[FRAME_HEADER + size:]
                    stream_id = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                    if frame[3] == HEADERS and stream_id:
                        if to_server:
                            if self._take("cut_before_request"):
                                dst.sendall(out)
                                self.fired.set()
                                cut()
                                return
                            if self._take("hold"):
                                dst.sendall(out)
                                out = b""
                                self.held.set()
                                self._release.wait(WAIT_S)
                            with self._lock:
                                self.requests += 1
                        elif self._take("cut_after_response"):
                            dst.sendall(out)
                            self.fired.set()
                            cut()
                            return
                    out += frame
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        finally:
            cut()


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
