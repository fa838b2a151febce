"""The injectable clock. Every instant and business date comes from here, so
tests can pin or move time; nothing else calls datetime.now()."""
from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Protocol
from zoneinfo import ZoneInfo

DEFAULT_TZ = "Asia/Shanghai"


class Clock(Protocol):
    tz: ZoneInfo

    def now(self) -> dt.datetime: ...


def business_date(clock: Clock) -> dt.date:
    """Today's date in the utility's time zone."""
    return clock.now().astimezone(clock.tz).date()


class SystemClock:
    def __init__(self, tz: str = DEFAULT_TZ) -> None:
        self.tz = ZoneInfo(tz)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class OffsetClock:
    """Real time shifted so that it starts at `start`: lets a whole process
    (and a test driving it) live on a chosen business day."""

    def __init__(self, start: dt.datetime, tz: str = DEFAULT_TZ) -> None:
        if start.tzinfo is None:
            raise ValueError("clock start must carry a time zone")
        self.tz = ZoneInfo(tz)
        self._offset = start - dt.datetime.now(dt.UTC)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self._offset


class ManualClock:
    """A clock that moves only when told: for unit tests."""

    def __init__(self, start: dt.datetime, tz: str = DEFAULT_TZ) -> None:
        if start.tzinfo is None:
            raise ValueError("clock start must carry a time zone")
        self.tz = ZoneInfo(tz)
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self._lock:
            return self._now

    def set(self, when: dt.datetime) -> None:
        with self._lock:
            self._now = when

    def advance(self, delta: dt.timedelta) -> None:
        with self._lock:
            self._now += delta


def make_clock(start_iso: str | None, tz: str = DEFAULT_TZ) -> Clock:
    """The process clock: system time, or system time shifted to start at `start_iso`."""
    if not start_iso:
        return SystemClock(tz)
    return OffsetClock(dt.datetime.fromisoformat(start_iso), tz)


def monotonic_s() -> float:
    return time.monotonic()


def utc_now(clock: Clock) -> dt.datetime:
    """The clock's instant in UTC: what every database column stores (SQLite and
    MariaDB keep no zone, so instants are always written as UTC)."""
    return clock.now().astimezone(dt.UTC)
