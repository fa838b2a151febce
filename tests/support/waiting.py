"""Waiting for a condition another process or thread brings about: polled,
bounded, and failing with what was awaited — never a bare sleep."""
from __future__ import annotations

import time
from collections.abc import Callable

WAIT_S = 20.0
POLL_S = 0.01


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(POLL_S)
