"""Continuous reconciliation: control totals of one settlement date, their
comparison, and how long a divergence must persist before it is flagged.

The bridge and mis_adapter each total the pays of one bank and one
settlement date from their own records (bridge/control_totals.py from the
journal, mis_adapter/control_totals.py from the MIS), exchange them over the
link (ExchangeControlTotals) and compare them here, with the same rules on
both sides:

- only definite outcomes count: pays the bridge does not know the outcome of
  yet (and pays whose cancel is in doubt) are left out on both sides;
- a pay counts once, by its state: posted and standing, or posted and then
  reversed;
- only pays posted before a cutoff the bridge chooses (the MIS's own
  `posted_at`, which both sides hold) count, so that a pay answered between
  the two reads is left out of both; a pay counts as reversed only when the
  reversal is older than the cutoff (the MIS's `reversed_at`; the bridge,
  which does not hold that instant, leaves out pays with a recent cancel);
- a divergence is flagged only once it has persisted past a window
  (`DivergenceTracker`): an answer crossing the two reads is not an alarm.

Pure: no I/O, no gRPC, no SQL. What it must never do: flag a single
observation, or compare totals of different settlement dates."""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["AGREE", "FLAGGED", "WATCHING", "ControlTotals", "Divergence", "DivergenceTracker", "Entry", "Verdict",
           "differing_serials", "divergence", "totals_of"]

AGREE = "AGREE"        # the totals agree (or the day is reconciled: daily reconciliation has taken over)
WATCHING = "WATCHING"  # they differ, not yet for longer than the window
FLAGGED = "FLAGGED"    # they have differed for longer than the window


@dataclass(frozen=True)
class Entry:
    """One pay as one side holds it."""
    amount_fen: int
    reversed: bool


@dataclass(frozen=True)
class ControlTotals:
    posted_count: int = 0
    posted_fen: int = 0
    reversed_count: int = 0
    reversed_fen: int = 0


def totals_of(entries: Iterable[Entry]) -> ControlTotals:
    posted_count = posted_fen = reversed_count = reversed_fen = 0
    for e in entries:
        if e.reversed:
            reversed_count += 1
            reversed_fen += e.amount_fen
        else:
            posted_count += 1
            posted_fen += e.amount_fen
    return ControlTotals(posted_count, posted_fen, reversed_count, reversed_fen)


@dataclass(frozen=True)
class Divergence:
    """How far two sides' totals are apart: fen and counts, posted and reversed added up (each as an
    absolute difference, so that a posted surplus cannot hide behind a reversed shortfall)."""
    fen: int
    count: int

    @property
    def agree(self) -> bool:
        return self.fen == 0 and self.count == 0


def divergence(ours: ControlTotals, theirs: ControlTotals) -> Divergence:
    return Divergence(
        fen=abs(ours.posted_fen - theirs.posted_fen) + abs(ours.reversed_fen - theirs.reversed_fen),
        count=abs(ours.posted_count - theirs.posted_count) + abs(ours.reversed_count - theirs.reversed_count))


def differing_serials(ours: Mapping[str, Entry], theirs: Iterable[tuple[str, Entry]], *, after: str,
                      through: str | None, limit: int) -> list[str]:
    """The serials, in order, of the range (`after`, `through`] (`through` None: to the end) that one side
    holds and the other does not, or holds with another amount or state; at most `limit`.
    `theirs` is the other side's listing of that range, ordered by serial."""
    listed = dict(theirs)
    mine = {s: e for s, e in ours.items() if s > after and (through is None or s <= through)}
    out = [s for s in sorted(mine.keys() | listed.keys()) if mine.get(s) != listed.get(s)]
    return out[:limit]


@dataclass(frozen=True)
class Verdict:
    state: str
    divergence: Divergence
    # This observation crossed the window: log once.
    newly_flagged: bool = False
    # A flagged divergence has ended: log once.
    cleared: bool = False
    # How long the divergence has lasted so far (0 when in agreement).
    persisted_s: float = 0.0

    @property
    def gauge_fen(self) -> int:
        """What `yindian_control_total_divergence_fen` shows: the divergence once flagged, else 0."""
        return self.divergence.fen if self.state == FLAGGED else 0

    @property
    def gauge_count(self) -> int:
        return self.divergence.count if self.state == FLAGGED else 0


@dataclass
class _BankState:
    day: dt.date | None = None
    since: dt.datetime | None = None
    flagged: bool = False


@dataclass
class DivergenceTracker:
    """Per bank: since when the totals have differed, and whether that is past `window_s`. An observation
    of another settlement date starts over; so does agreement. Thread-safe (the MIS observes from its
    request threads)."""
    window_s: float
    _banks: dict[str, _BankState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, bank: str, day: dt.date, div: Divergence, now: dt.datetime) -> Verdict:
        with self._lock:
            st = self._banks.setdefault(bank, _BankState())
            if st.day != day:
                was_flagged = st.flagged
                st.day, st.since, st.flagged = day, None, False
                if div.agree:
                    return Verdict(AGREE, div, cleared=was_flagged)
            if div.agree:
                cleared = st.flagged
                st.since, st.flagged = None, False
                return Verdict(AGREE, div, cleared=cleared)
            if st.since is None:
                st.since = now
            persisted_s = max(0.0, (now - st.since).total_seconds())
            if persisted_s < self.window_s:
                return Verdict(WATCHING, div, persisted_s=persisted_s)
            newly = not st.flagged
            st.flagged = True
            return Verdict(FLAGGED, div, newly_flagged=newly, persisted_s=persisted_s)

    def settle(self, bank: str, day: dt.date, now: dt.datetime) -> Verdict:
        """The day is reconciled: nothing to compare any more (daily reconciliation has taken over)."""
        return self.observe(bank, day, Divergence(0, 0), now)
