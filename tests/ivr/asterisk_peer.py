"""Plays Asterisk's side of a FastAGI call line by line: the agi_* header
block, then for each command the server sends, the reply the test chooses."""
from __future__ import annotations

import socket

HEADER_LINES = (
    "agi_network: yes", "agi_network_script: ", "agi_request: agi://127.0.0.1:4573",
    "agi_channel: PJSIP/trunk-00000001", "agi_language: zh", "agi_type: PJSIP",
    "agi_uniqueid: 1764295200.1", "agi_version: 20.5.0", "agi_callerid: 13900001111",
    "agi_calleridname: unknown", "agi_callingpres: 0", "agi_callingani2: 0", "agi_callington: 0",
    "agi_callingtns: 0", "agi_dnid: 95598", "agi_rdnis: unknown", "agi_context: yindian-ivr",
    "agi_extension: 95598", "agi_priority: 1", "agi_enhanced: 0.0", "agi_accountcode: ",
    "agi_threadid: 140211111111111",
)


class AsteriskPeer:
    def __init__(self, addr: str, timeout_s: float = 20.0) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self._buf = b""
        self.sent: list[str] = []  # every command the server sent, in order

    def send_headers(self) -> None:
        self.sock.sendall(("\n".join(HEADER_LINES) + "\n\n").encode())

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def read_command(self) -> str | None:
        """The server's next command line, or None when it closed the connection."""
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(4096)
            except ConnectionResetError:  # closed with our unread lines pending: a reset, still a close
                return None
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode()
        self.sent.append(text)
        return text

    def expect(self, command: str, reply: str) -> None:
        got = self.read_command()
        assert got == command, f"expected {command!r}, server sent {got!r} (so far {self.sent})"
        self.send(reply)

    def expect_closed(self) -> None:
        got = self.read_command()
        assert got is None, f"server sent {got!r} after the call should have ended"

    def close(self) -> None:
        self.sock.close()
