"""Bounded shares of the database connections (issue 9 item 5), so that one
bank, or long-lived streams, can never take every pooled connection:

- streams (Reconcile) hold a connection for their whole life: at most
  `db_stream_connections_max` of them at once, across banks;
- one bank's calls and streams together hold at most
  `db_bank_connections_max` connections.

A unary call waits for its bank's share no longer than the pool timeout or
its deadline; a stream is refused at once. Either refusal is
RESOURCE_EXHAUSTED with a reason (STREAM_CONNECTION_SHARE,
BANK_CONNECTION_SHARE). Shares are counted per process, over the pool of
each database (a call uses one connection at a time)."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from yindian_common.errors import Exhausted

T = TypeVar("T")
# Banks tracked at once: bank ids reaching here are known banks (checked against the database first).
BANKS_TRACKED_MAX = 10_000


class ConnectionShares:
    def __init__(self, *, pool_size: int, streams_max: int, bank_max: int, wait_s: float) -> None:
        self.streams_max = streams_max or max(1, pool_size // 4)
        self.bank_max = bank_max or max(1, pool_size // 2)
        if self.streams_max >= pool_size or self.bank_max >= pool_size:
            raise SystemExit(f"db_stream_connections_max ({self.streams_max}) and db_bank_connections_max "
                             f"({self.bank_max}) must each be below db_pool_size ({pool_size})")
        self._wait_s = wait_s
        self._streams = threading.BoundedSemaphore(self.streams_max)
        self._lock = threading.Lock()
        self._banks: dict[str, threading.BoundedSemaphore] = {}

    def _bank(self, bank_id: str) -> threading.BoundedSemaphore:
        with self._lock:
            sem = self._banks.get(bank_id)
            if sem is None:
                if len(self._banks) >= BANKS_TRACKED_MAX:
                    raise Exhausted(f"more than {BANKS_TRACKED_MAX} banks", reason="BANK_CONNECTION_SHARE")
                sem = self._banks[bank_id] = threading.BoundedSemaphore(self.bank_max)
            return sem

    @contextmanager
    def call(self, bank_id: str, time_left_s: float | None) -> Iterator[None]:
        """A unary call of `bank_id` holding (at most) one connection."""
        sem = self._bank(bank_id)
        wait_s = self._wait_s if time_left_s is None else max(0.0, min(self._wait_s, time_left_s))
        if not sem.acquire(timeout=wait_s):
            raise Exhausted(f"bank {bank_id} holds its share of {self.bank_max} database connections",
                            reason="BANK_CONNECTION_SHARE")
        try:
            yield
        finally:
            sem.release()

    def stream(self, bank_id: str, responses: Iterator[T]) -> Iterator[T]:
        """`responses` of a stream of `bank_id` that holds a connection while it lasts."""
        if not self._streams.acquire(blocking=False):
            raise Exhausted(f"{self.streams_max} streams already hold database connections",
                            reason="STREAM_CONNECTION_SHARE")
        try:
            sem = self._bank(bank_id)
            if not sem.acquire(blocking=False):
                raise Exhausted(f"bank {bank_id} holds its share of {self.bank_max} database connections",
                                reason="BANK_CONNECTION_SHARE")
            try:
                yield from responses
            finally:
                sem.release()
        finally:
            self._streams.release()
