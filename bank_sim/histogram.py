"""Latency histograms for the load tester: a thin wrapper over HdrHistogram
that records seconds as whole microseconds, clamps values outside its range
(and counts them) instead of failing mid-run, and summarises to the figures
a ghz-style report shows. Never used on a server's request path."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

LATENCY_MIN_US = 1
SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True)
class LatencySummary:
    """Figures in milliseconds (a person reads them); count is calls."""

    count: int
    fastest_ms: float
    slowest_ms: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    clamped: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LatencyHistogram:
    """Records latencies up to `latency_max_s`; larger ones are clamped to it and counted."""

    def __init__(self, latency_max_s: float) -> None:
        if latency_max_s <= 0:
            raise ValueError("latency_max_s must be positive")
        self._max_us = max(LATENCY_MIN_US + 1, int(latency_max_s * 1_000_000))
        self._hist = HdrHistogram(LATENCY_MIN_US, self._max_us, SIGNIFICANT_DIGITS)
        self.clamped = 0
        self._sum_us = 0  # the mean from a running sum: hdrh's get_mean_value walks every bucket

    def record_s(self, latency_s: float) -> None:
        us = int(latency_s * 1_000_000)
        if us < LATENCY_MIN_US:
            us = LATENCY_MIN_US
        elif us > self._max_us:
            us = self._max_us
            self.clamped += 1
        self._hist.record_value(us)
        self._sum_us += us

    def merge(self, other: LatencyHistogram) -> None:
        self._hist.add(other._hist)
        self.clamped += other.clamped
        self._sum_us += other._sum_us

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        return self._hist.get_value_at_percentile(percentile) / 1000 if self.count else 0.0

    def summary(self) -> LatencySummary:
        if not self.count:
            return LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, self.clamped)
        # get_value_at_percentile walks the counts array; the percentile iterator is ~10x slower.
        p = {q: self._hist.get_value_at_percentile(q) for q in PERCENTILES}
        return LatencySummary(
            count=self.count,
            fastest_ms=self._hist.get_min_value() / 1000,
            slowest_ms=self._hist.get_max_value() / 1000,
            mean_ms=round(self._sum_us / self.count / 1000, 3),
            p50_ms=p[50.0] / 1000, p90_ms=p[90.0] / 1000, p99_ms=p[99.0] / 1000, p999_ms=p[99.9] / 1000,
            clamped=self.clamped)

    def encode(self) -> str:
        """The HdrHistogram's compressed base64 form, for comparing runs offline."""
        return self._hist.encode().decode("ascii") if self.count else ""
