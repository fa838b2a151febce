"""Watches continuous reconciliation from outside, as an operator's
Prometheus would: samples `yindian_control_total_divergence_fen{bank=...}`
on both servers' /metrics while the chaos soak runs (it must stay 0 through
every fault), waits for exchanges to agree after quiescence, and measures
how long an injected discrepancy takes to be flagged on each server.

Speaks only HTTP to the servers' metrics endpoints (bank_sim imports
nothing of either server). A process being restarted has no endpoint for a
moment: that sample is counted as missed, not as a value."""
from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

DIVERGENCE = "yindian_control_total_divergence_fen"
EXCHANGES = "yindian_control_total_exchanges_total"
SCRAPE_TIMEOUT_S = 5.0
POLL_S = 0.1
NONZERO_KEPT_MAX = 10


def scrape(port: int, bank: str) -> tuple[float, dict[str, float]] | None:
    """(divergence gauge, exchanges by result) of `bank` on the process at `port`; None if unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    gauge, exchanges = 0.0, {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("bank") != bank:
                continue
            if s.name == DIVERGENCE:
                gauge = float(s.value)
            elif s.name == EXCHANGES:
                exchanges[s.labels.get("result", "")] = float(s.value)
    return gauge, exchanges


@dataclass
class ControlWatch:
    """`ports()` gives the current metrics port of each side (it changes when a process is restarted)."""
    ports: Callable[[], dict[str, int]]
    bank: str
    interval_s: float
    samples: int = 0
    missed: int = 0
    max_fen: float = 0.0
    nonzero: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="control-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(SCRAPE_TIMEOUT_S * 4)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.interval_s):
            for side, port in self.ports().items():
                got = scrape(port, self.bank)
                if got is None:
                    self.missed += 1
                    continue
                self.samples += 1
                if got[0] != 0:
                    self.max_fen = max(self.max_fen, got[0])
                    if len(self.nonzero) < NONZERO_KEPT_MAX:
                        self.nonzero.append(f"{side}={got[0]:.0f} fen at {time.monotonic() - t0:.1f} s")

    def wait_agreeing(self, exchanges: int, timeout_s: float) -> bool:
        """True once each side has answered `exchanges` more AGREE exchanges than now, within the time."""
        def agree() -> dict[str, float]:
            out = {}
            for side, port in self.ports().items():
                got = scrape(port, self.bank)
                out[side] = got[1].get("AGREE", 0.0) if got is not None else -1.0
            return out

        base = agree()
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            now = agree()
            if all(now[s] >= base[s] + exchanges and base[s] >= 0 for s in now):
                return True
            time.sleep(POLL_S)  # polling other processes' /metrics: nothing to wait on
        return False

    def seconds_to_flag(self, since: float, timeout_s: float) -> dict[str, float | None]:
        """Seconds from `since` (time.monotonic()) until each side's gauge is non-zero (None: not in time)."""
        flagged: dict[str, float | None] = {side: None for side in self.ports()}
        t_end = since + timeout_s
        while time.monotonic() < t_end and any(v is None for v in flagged.values()):
            for side, port in self.ports().items():
                got = scrape(port, self.bank)
                if flagged.get(side) is None and got is not None and got[0] != 0:
                    flagged[side] = time.monotonic() - since
            time.sleep(POLL_S)  # polling other processes' /metrics: nothing to wait on
        return flagged
