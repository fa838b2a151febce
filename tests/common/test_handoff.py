"""yindian_common.handoff.received: a stream's messages read on a thread, the
wait for a silent peer bounded, the receiver never left behind."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.support.waiting import wait_until
from yindian_common.errors import ReconPeerSilent
from yindian_common.handoff import received


def silent() -> Exception:
    return ReconPeerSilent("silent")


def alive(name: str) -> bool:
    return any(t.name == name for t in threading.enumerate())


def test_items_arrive_in_order_and_the_end_ends_them() -> None:
    with received(iter(range(100)), queue_max=2, silence_s=30, silent=silent, name="rx-order") as items:
        assert list(items) == list(range(100))
    wait_until(lambda: not alive("rx-order"), "the receiver to end")


def test_an_error_of_the_source_is_raised_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        raise ValueError("peer went away")

    with received(source(), queue_max=2, silence_s=30, silent=silent, name="rx-error") as items:
        assert next(items) == 1
        with pytest.raises(ValueError, match="peer went away"):
            next(items)


def test_a_silent_peer_is_refused_and_the_receiver_ends_with_the_stream() -> None:
    more, ended = threading.Event(), threading.Event()

    def source() -> Iterator[int]:
        yield 1
        more.wait(60)  # the peer is silent until its call ends
        ended.set()

    with pytest.raises(ReconPeerSilent), \
            received(source(), queue_max=2, silence_s=0.2, silent=silent, name="rx-silent") as items:
        assert next(items) == 1
        next(items)
    assert alive("rx-silent")  # still waiting on the peer ...
    more.set()  # ... until the call ends its request iterator
    wait_until(lambda: not alive("rx-silent"), "the receiver to end")
    assert ended.is_set()


def test_a_receiver_blocked_on_a_full_queue_ends_once_the_reader_is_done() -> None:
    with received(iter(range(1_000_000)), queue_max=2, silence_s=30, silent=silent, name="rx-full") as items:
        assert next(items) == 0
    wait_until(lambda: not alive("rx-full"), "the receiver to end")
