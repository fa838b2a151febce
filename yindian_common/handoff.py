"""Hand-offs between a stream's receiving thread and the thread that works on
what it received, through a bounded queue: the receiver blocks while the
queue is full (back-pressure to the peer) but never past the worker's stop.

Must never: drop an item silently, or block a stopped stream for ever."""
from __future__ import annotations

import queue
import threading
from typing import TypeVar

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
