"""The AGI line protocol on its own: what Asterisk may answer and how each
answer reads (golden reply lines from Asterisk's res_agi)."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ivr.agi import AgiHangup, AgiLimits, AgiProtocolError, AgiSession, AgiTimeout, quote

pytestmark = pytest.mark.timeout(30)
FAST = AgiLimits(reply_margin_s=0.3, header_timeout_s=0.3)


class _Sink:
    """Stands in for the socket's writing half: keeps what the server sent."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, b: bytes) -> None:
        self.data += b

    async def drain(self) -> None:
        return None


def run(script: bytes, action: Callable[[AgiSession], Awaitable[Any]], *, eof: bool = True,
        limits: AgiLimits = FAST) -> tuple[Any, bytes]:
    async def go() -> tuple[Any, bytes]:
        reader = asyncio.StreamReader(limit=limits.line_bytes_max)
        reader.feed_data(script)
        if eof:
            reader.feed_eof()
        sink = _Sink()
        session = AgiSession(reader, sink, limits)  # type: ignore[arg-type]
        return await action(session), sink.data
    return asyncio.run(go())


def test_header_block_is_read_to_the_blank_line() -> None:
    headers, _ = run(b"agi_network: yes\nagi_request: agi://h/ivr\nagi_accountcode: \n\n",
                     lambda s: s.read_headers())
    assert headers == {"agi_network": "yes", "agi_request": "agi://h/ivr", "agi_accountcode": ""}


@pytest.mark.parametrize("script", [b"", b"agi_network: yes\n", b"GET / HTTP/1.1\n\n", b"\n",
                                    b"agi_x: 1\n" * 200 + b"\n"])
def test_bad_or_unfinished_header_blocks_are_refused(script: bytes) -> None:
    with pytest.raises((AgiHangup, AgiProtocolError)):
        run(script, lambda s: s.read_headers())


def test_unfinished_header_block_times_out_when_the_socket_stays_open() -> None:
    with pytest.raises(AgiTimeout):
        run(b"agi_network: yes\n", lambda s: s.read_headers(), eof=False)


@pytest.mark.parametrize(("reply", "expected"), [
    (b"200 result=0100000017\n", ("0100000017", False)),
    (b"200 result=12 (timeout)\n", ("12", True)),
    (b"200 result= (timeout)\n", ("", True)),
])
def test_get_data_returns_the_digits_themselves(reply: bytes, expected: tuple[str, bool]) -> None:
    got, sent = run(reply, lambda s: s.get_data("/p/abc", 1.0, 3000, 10))
    assert got == expected and sent == b'GET DATA "/p/abc" 3000 10\n'


@pytest.mark.parametrize(("reply", "key"), [(b"200 result=0 endpos=8000\n", None),
                                            (b"200 result=49 endpos=100\n", "1"),
                                            (b"200 result=35 endpos=100\n", "#")])
def test_stream_file_answers_the_key_as_its_ascii_code(reply: bytes, key: str | None) -> None:
    got, sent = run(reply, lambda s: s.stream_file("/p/abc", 1.0, "120"))
    assert got == key and sent == b'STREAM FILE "/p/abc" "120"\n'


@pytest.mark.parametrize("reply", [
    b"HANGUP\n200 result=-1 endpos=0\n",
    b"511 Command Not Permitted on a dead channel or intercepted channel\n",
    b"200 result=-1\n",
    b"",
])
def test_every_form_of_hang_up_is_a_hang_up(reply: bytes) -> None:
    with pytest.raises(AgiHangup):
        run(reply, lambda s: s.wait_for_digit(1000))


@pytest.mark.parametrize("reply", [
    b"510 Invalid or unknown command\n",
    b"520-Invalid command syntax.  Proper usage follows:\nUsage: WAIT FOR DIGIT <timeout>\n520 End of proper usage.\n",
    b"200 result=abc\n",
    b"200 result=999\n",
    b"hello\n",
    b"200 result=" + b"1" * 3000 + b"\n",
    b"\xff\xfe\n",
])
def test_what_we_cannot_accept_is_a_protocol_error(reply: bytes) -> None:
    with pytest.raises(AgiProtocolError):
        run(reply, lambda s: s.wait_for_digit(1000))


def test_a_silent_asterisk_times_out_after_the_command_and_its_margin() -> None:
    with pytest.raises(AgiTimeout):
        run(b"", lambda s: s.wait_for_digit(100), eof=False)


def test_arguments_cannot_smuggle_a_second_command() -> None:
    with pytest.raises(ValueError):
        quote('x"\nHANGUP')
    with pytest.raises(ValueError):
        run(b"", lambda s: s.command("ANSWER\nHANGUP", 0))
