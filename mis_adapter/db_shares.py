"""Bounded shares of the database connections for streams (issue 9 item 5),
so that stalled streams can never take the connections every bank's calls
need: a Reconcile stream holds a pooled connection for its whole life, so

- at most `db_stream_connections_max` streams hold one at once, across banks;
- one bank's streams hold at most `db_bank_stream_connections_max` of them.

A stream past either share is refused at once: RESOURCE_EXHAUSTED with the
reason STREAM_CONNECTION_SHARE or BANK_CONNECTION_SHARE. Unary calls take no
share: each holds its connection for one transaction, whose every wait is
bounded by the call's deadline (yindian_common.db), and the pool queues
waiting calls in order, so a bank's calls cannot keep another bank's out;
a semaphore per call would put a thread hand-off on every Pay (measured:
about a tenth of mis_adapter's CPU at 32 in flight)."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TypeVar

from yindian_common.errors import Exhausted

T = TypeVar("T")


class ConnectionShares:
    def __init__(self, *, pool_size: int, streams_max: int, bank_streams_max: int) -> None:
        self.streams_max = streams_max or max(1, pool_size // 4)
        self.bank_streams_max = bank_streams_max or max(1, self.streams_max // 2)
        if self.streams_max >= pool_size:
            raise SystemExit(f"db_stream_connections_max ({self.streams_max}) must be below db_pool_size "
                             f"({pool_size}): calls need connections too")
        self._lock = threading.Lock()
        self._streams = 0
        self._by_bank: dict[str, int] = {}  # banks with a stream open: at most streams_max entries

    def _take(self, bank_id: str) -> None:
        with self._lock:
            if self._streams >= self.streams_max:
                raise Exhausted(f"{self.streams_max} streams already hold database connections",
                                reason="STREAM_CONNECTION_SHARE")
            n = self._by_bank.get(bank_id, 0)
            if n >= self.bank_streams_max:
                raise Exhausted(f"bank {bank_id} already has {n} streams holding database connections "
                                f"(limit {self.bank_streams_max})", reason="BANK_CONNECTION_SHARE")
            self._streams += 1
            self._by_bank[bank_id] = n + 1

    def _give_back(self, bank_id: str) -> None:
        with self._lock:
            self._streams -= 1
            n = self._by_bank[bank_id] - 1
            if n:
                self._by_bank[bank_id] = n
            else:
                del self._by_bank[bank_id]

    def stream(self, bank_id: str, responses: Iterator[T]) -> Iterator[T]:
        """`responses` of a stream of `bank_id` that holds a connection while it lasts."""
        self._take(bank_id)
        try:
            yield from responses
        finally:
            self._give_back(bank_id)
