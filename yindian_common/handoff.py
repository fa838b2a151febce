"""Hand-offs between a stream's receiving thread and the thread that works on
what it received, through a bounded queue: the receiver blocks while the
queue is full (back-pressure to the peer) but never past the worker's stop.

Must never: drop an item silently, block a stopped stream for ever, or wait
for a silent peer without a bound (`received`)."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar, cast

T = TypeVar("T")

# How often a receiver blocked on a full queue looks whether the worker stopped.
STOP_POLL_S = 0.5


def put_until_stopped(q: queue.Queue[T], item: T, stop: threading.Event) -> bool:
    """Puts `item`, blocking while `q` is full; False (not put) once `stop` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=STOP_POLL_S)
            return True
        except queue.Full:
            continue
    return False


@contextmanager
def received(source: Iterator[T], *, queue_max: int, silence_s: float, silent: Callable[[], Exception],
             name: str) -> Iterator[Iterator[T]]:
    """The items of `source` (a stream's request iterator), read on a
    receiving thread into a queue of at most `queue_max`, so that waiting for
    the peer is bounded: the iterator yielded raises `silent()` once nothing
    has arrived for `silence_s` while it is asked for the next item. Only the
    wait for the peer is bounded, never the work between two asks. An error
    of `source` is raised where its item would have been.

    The receiver blocks while the queue is full (back-pressure to the peer:
    memory stays bounded however slow the reader) and stops at its next put
    once the `with` block is left; one still waiting on the peer then ends
    when the stream's call ends, as grpc ends its request iterator."""
    inbox: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=queue_max)
    stop = threading.Event()

    def receive() -> None:
        last: tuple[bool, object] = (False, None)  # (False, None): the end; (False, exc): the source's error
        try:
            for item in source:
                if not put_until_stopped(inbox, (True, item), stop):
                    return
        except Exception as exc:  # handed to the reader, raised there as the source would have
            last = (False, exc)
        put_until_stopped(inbox, last, stop)

    def items() -> Iterator[T]:
        while True:
            try:
                more, item = inbox.get(timeout=silence_s)
            except queue.Empty:
                raise silent() from None
            if not more:
                if isinstance(item, Exception):
                    raise item
                return
            yield cast(T, item)

    threading.Thread(target=receive, name=name, daemon=True).start()
    try:
        yield items()
    finally:
        stop.set()
