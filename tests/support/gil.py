"""Threads that hold the interpreter lock as much as a busy server's workers
do: they widen the races between grpcio's completion-queue thread and the
threads a handler runs on, which a quiet test process hides."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

JOIN_S = 10.0


@contextmanager
def holding_the_gil(threads: int = 2) -> Iterator[None]:
    stop = threading.Event()

    def hold() -> None:
        while not stop.is_set():
            sum(range(2000))

    holders = [threading.Thread(target=hold, name="gil-holder", daemon=True) for _ in range(threads)]
    for t in holders:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in holders:
            t.join(JOIN_S)
