"""The Asterisk Gateway Interface line protocol, as FastAGI speaks it over TCP.

Asterisk connects, sends a block of `agi_<name>: <value>` lines ended by a
blank line, then waits for commands; each command gets one reply line

    200 result=<value>[ (<data>)][ key=value ...]

(`520-...` usage help spans lines up to `520 End of proper usage.`). When
the caller hangs up, Asterisk sends a bare `HANGUP` line, answers further
channel commands with `511 Command Not Permitted on a dead channel ...`,
and eventually closes the socket.

Why not panoramisk's fast_agi (1.4): its header loop spins forever on a
socket closed before the blank line, grows its buffer without bound, and no
read has a timeout; we need every read bounded in bytes and time.

This module only frames and parses: it never decides what a call does. Errors:

    AgiError
    ├── AgiHangup         the caller is gone (HANGUP line, 511, result=-1, EOF)
    ├── AgiTimeout        Asterisk did not answer within the read's deadline
    └── AgiProtocolError  a line we cannot accept (too long, too many headers,
                          not ASCII/UTF-8, unparseable, 510/520 to our command)
"""
from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass

__all__ = ["AgiError", "AgiHangup", "AgiLimits", "AgiProtocolError", "AgiReply", "AgiSession", "AgiTimeout"]


class AgiError(Exception):
    pass


class AgiHangup(AgiError):
    pass


class AgiTimeout(AgiError):
    pass


class AgiProtocolError(AgiError):
    pass


@dataclass(frozen=True)
class AgiLimits:
    line_bytes_max: int = 2048      # one header or reply line
    header_lines_max: int = 128     # the agi_* block
    header_timeout_s: float = 5.0   # Asterisk sends the block at once
    reply_margin_s: float = 5.0     # added to a command's own duration
    usage_lines_max: int = 64       # a 520 usage block


_REPLY_RE = re.compile(r"(\d{3})[ -](.*)")
_RESULT_RE = re.compile(r"result=(\S*)(?: \(([^)]*)\))?(.*)")
_HEADER_RE = re.compile(r"(agi_[a-z0-9_]+): ?(.*)")


@dataclass(frozen=True)
class AgiReply:
    code: int
    result: str
    data: str = ""
    extra: str = ""

    @property
    def result_int(self) -> int:
        try:
            return int(self.result)
        except ValueError:
            raise AgiProtocolError(f"result is not a number: {self.result!r}") from None


def quote(arg: str) -> str:
    """One command argument, double-quoted so spaces survive Asterisk's parser."""
    if any(c in arg for c in '"\\\n\r'):
        raise ValueError(f"AGI argument may not contain quotes, backslashes or newlines: {arg!r}")
    return f'"{arg}"'


class AgiSession:
    """One FastAGI connection: read the header block, then command/reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 limits: AgiLimits = AgiLimits()) -> None:
        self._reader = reader
        self._writer = writer
        self.limits = limits
        self.headers: dict[str, str] = {}
        self.hung_up = False

    async def _line(self, timeout_s: float) -> str:
        try:
            raw = await asyncio.wait_for(self._reader.readuntil(b"\n"), timeout_s)
        except TimeoutError:
            raise AgiTimeout(f"no line from Asterisk within {timeout_s:.1f}s") from None
        except asyncio.IncompleteReadError:
            self.hung_up = True
            raise AgiHangup("Asterisk closed the connection") from None
        except (asyncio.LimitOverrunError, ValueError):
            raise AgiProtocolError(f"line longer than {self.limits.line_bytes_max} bytes") from None
        except ConnectionError as exc:
            self.hung_up = True
            raise AgiHangup(f"connection lost: {exc}") from exc
        if len(raw) > self.limits.line_bytes_max:
            raise AgiProtocolError(f"line longer than {self.limits.line_bytes_max} bytes")
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise AgiProtocolError("line is not UTF-8") from None

    async def read_headers(self) -> dict[str, str]:
        for _ in range(self.limits.header_lines_max):
            line = await self._line(self.limits.header_timeout_s)
            if line == "":
                if not self.headers:
                    raise AgiProtocolError("empty AGI header block")
                return self.headers
            m = _HEADER_RE.fullmatch(line)
            if m is None:
                raise AgiProtocolError(f"not an agi_* header line: {line[:80]!r}")
            self.headers[m.group(1)] = m.group(2)
        raise AgiProtocolError(f"more than {self.limits.header_lines_max} header lines")

    async def command(self, line: str, duration_s: float) -> AgiReply:
        """Sends one command and reads its reply; `duration_s` is how long the
        command itself may take (playback, digit timeouts) before the margin."""
        if self.hung_up:
            raise AgiHangup("the caller has hung up")
        if "\n" in line or "\r" in line:
            raise ValueError("an AGI command is one line")
        try:
            self._writer.write(line.encode("utf-8") + b"\n")
            await self._writer.drain()
        except ConnectionError as exc:
            self.hung_up = True
            raise AgiHangup(f"connection lost: {exc}") from exc
        timeout_s = duration_s + self.limits.reply_margin_s
        while True:
            text = await self._line(timeout_s)
            if text == "HANGUP":  # asynchronous notice: the caller hung up
                self.hung_up = True
                raise AgiHangup("caller hung up")
            return await self._parse_reply(text, timeout_s)

    async def _parse_reply(self, text: str, timeout_s: float) -> AgiReply:
        m = _REPLY_RE.fullmatch(text)
        if m is None:
            raise AgiProtocolError(f"not an AGI reply: {text[:80]!r}")
        code = int(m.group(1))
        if code == 511:
            self.hung_up = True
            raise AgiHangup("dead channel (511)")
        if code == 520:
            for _ in range(self.limits.usage_lines_max):
                if (await self._line(timeout_s)).startswith("520 End"):
                    break
            raise AgiProtocolError("Asterisk refused our command syntax (520)")
        if code != 200:
            raise AgiProtocolError(f"Asterisk answered {code}: {m.group(2)[:80]!r}")
        r = _RESULT_RE.fullmatch(m.group(2))
        if r is None:
            raise AgiProtocolError(f"reply without result=: {text[:80]!r}")
        return AgiReply(code, r.group(1), r.group(2) or "", r.group(3).strip())

    # --- the commands a self-service call uses ---

    async def answer(self) -> None:
        if (await self.command("ANSWER", 0)).result_int == -1:
            raise AgiHangup("ANSWER failed")

    async def get_data(self, file_stem: str, prompt_s: float, timeout_ms: int, max_digits: int) -> tuple[str, bool]:
        """Plays a prompt and collects up to `max_digits` DTMF digits (# ends
        early). Returns (digits, timed_out); the reply carries the digits themselves."""
        reply = await self.command(f"GET DATA {quote(file_stem)} {timeout_ms} {max_digits}",
                                   prompt_s + (max_digits + 1) * timeout_ms / 1000)
        if reply.result == "-1":
            raise AgiHangup("GET DATA failed (hang-up)")
        if not re.fullmatch(r"[0-9*#]*", reply.result):
            raise AgiProtocolError(f"GET DATA result is not DTMF: {reply.result!r}")
        return reply.result, reply.data == "timeout"

    async def stream_file(self, file_stem: str, prompt_s: float, escape_digits: str = "") -> str | None:
        """Plays a prompt; a key in `escape_digits` interrupts it. Returns that key or None."""
        reply = await self.command(f"STREAM FILE {quote(file_stem)} {quote(escape_digits)}", prompt_s)
        return _dtmf_from_ascii(reply, "STREAM FILE")

    async def wait_for_digit(self, timeout_ms: int) -> str | None:
        reply = await self.command(f"WAIT FOR DIGIT {timeout_ms}", timeout_ms / 1000)
        return _dtmf_from_ascii(reply, "WAIT FOR DIGIT")

    async def hangup(self) -> None:
        if self.hung_up:
            return
        with contextlib.suppress(AgiHangup):
            await self.command("HANGUP", 0)
        self.hung_up = True


def _dtmf_from_ascii(reply: AgiReply, what: str) -> str | None:
    """STREAM FILE and WAIT FOR DIGIT answer the key's ASCII code: 0 none, -1 hang-up."""
    code = reply.result_int
    if code == -1:
        raise AgiHangup(f"{what} failed (hang-up)")
    if code == 0:
        return None
    key = chr(code) if 0 < code < 128 else ""
    if key not in "0123456789*#ABCD" or not key:
        raise AgiProtocolError(f"{what} result is not a DTMF key: {code}")
    return key
