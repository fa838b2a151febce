"""In-process ownership of serials (`Claims`) and the group-commit writer
thread that journals new rows and records outcomes in batches."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from bridge.journal.records import Entry, Outcome, outcome_for
from bridge.journal.repository import Journal
from bridge.journal.schema import SUSPECT, WRITER_BACKOFF_CAP_S
from yindian_common.clock import Clock

log = logging.getLogger("yindian.bridge.journal")


# ---- a one-shot signal, cheaper than threading.Event ----

class Latch:
    """Set once, waited for by any number of threads. A bare lock held from creation
    until `set`: creating one and waking its waiter costs a fraction of a
    threading.Event (no Condition, no waiter list), and the bridge makes several per pay."""
    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        try:  # a plain try costs nothing when nothing is raised (contextlib.suppress builds an object per call)
            self._lock.release()
        except RuntimeError:  # another thread set it at the same moment
            return

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout_s: float | None = None) -> bool:
        if self._set:
            return True
        if not self._lock.acquire(timeout=-1 if timeout_s is None else max(0.0, timeout_s)):
            return self._set
        self._lock.release()  # let the next waiter through
        return True


# ---- in-process ownership of serials ----

@dataclass
class Claim:
    """One thread's ownership of a serial. Waiters read `result` once `done` is set."""
    key: tuple[str, str]
    done: Latch = field(default_factory=Latch)
    released: Latch = field(default_factory=Latch)
    result: Any = None

    def finish(self, result: Any) -> None:
        self.result = result
        self.done.set()


class Claims:
    """Which serials a thread of this process is acting on right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], Claim] = {}

    def acquire(self, key: tuple[str, str]) -> tuple[Claim, bool]:
        """(the claim, True) if the caller now owns `key`; else (the holder's claim, False)."""
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                return held, False
            claim = Claim(key)
            self._held[key] = claim
            return claim, True

    def release(self, claim: Claim) -> None:
        with self._lock:
            if self._held.get(claim.key) is claim:
                del self._held[claim.key]
        claim.done.set()
        claim.released.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


# ---- group-commit writer ----

@dataclass
class _Flush:
    done: Latch = field(default_factory=Latch)


@dataclass
class NewRow:
    """A request to journal, waited for by the thread that owns its claim.
    If that thread gives up waiting (`abandon`), the writer takes the claim
    over: a row it inserted for nobody is recorded SUSPECT, so the resolver
    settles it (it may not be forwarded any more, but the bridge never guesses)."""
    entry: Entry
    claim: Claim
    done: Latch = field(default_factory=Latch)
    inserted: bool = False
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self, timeout_s: float) -> bool:
        """True once written (see `inserted`); False if the caller gave up (the writer now owns the claim)."""
        if self.done.wait(timeout_s):
            return True
        with self.lock:
            if self.done.is_set():
                return True
            self.abandoned = True
            return False


@dataclass
class Recording:
    """An outcome on its way to the journal; `done` is set once it is durable."""
    outcome: Outcome
    claim: Claim | None
    waited: bool
    done: Latch = field(default_factory=Latch)

    def wait(self, timeout_s: float) -> bool:
        return self.done.wait(timeout_s)


_Item = Recording | NewRow | _Flush | None

# The commit linger's arrival rate: the newest batch's weight in the moving average, and the shortest
# interval a batch is counted over (two takes in the same clock tick).
ARRIVAL_WEIGHT = 0.5
ARRIVAL_INTERVAL_MIN_S = 1e-4


class JournalWriter:
    """Writes new rows and outcomes in group commits on one thread: one
    transaction (one fsync) for everything that queued up meanwhile. An
    outcome's claim is released once it is durable, so a serial's next owner
    reads the recorded state.

    Batching by time as well as by queue (`commit_linger_s`, 0 = off): at open-loop
    rates the writer is often idle when a row arrives, and without a wait every pay
    pays a commit (and a writer wake-up) of its own for its row and again for its
    outcome. Woken from idle, the writer first waits `commit_linger_s` (a bound, not a poll: it is not
    woken per arrival meanwhile) so that what arrives in that time shares the
    commit; work that queued while a commit was running is written at once (it has
    waited a commit already). It lingers only when company is expected: when the
    recent arrival rate (items per second between the writer's takes, a moving
    average over batches; unknown at start, which lingers) brings at least one more
    item within the linger. At a quiet counter's pace a pay's row and outcome are
    written at once instead of each waiting the whole linger for nobody. Outcomes
    nobody waits for (`waited=False`) may wait up to `linger_s` for company. A batch
    holds at most `batch_max` rows and outcomes.

    The hand-off is a deque (appends and pops are atomic) plus one wake lock
    released only when the writer sleeps idle, instead of queue.Queue's condition
    variables: a put is an append and, at most, one lock release."""

    def __init__(self, journal: Journal, claims: Claims, clock: Clock, *, batch_max: int, queue_max: int,
                 idle_wait_s: float, linger_s: float = 0.0, commit_linger_s: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._journal = journal
        self._clock = clock
        self._claims = claims
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._idle_wait_s = idle_wait_s
        self._linger_s = linger_s
        self._commit_linger_s = commit_linger_s
        self._sleep = sleep  # the commit linger's wait (a test sees what arrives during it)
        self._monotonic = monotonic  # the arrival rate's time base (a test sets the pace)
        # Items (rows, outcomes) per second arriving between takes, averaged over batches; None until the
        # first batch (the first wake lingers). Written by the writer thread only (and by start).
        self._arrivals_per_s: float | None = None
        self._last_take: float | None = None
        self.transactions = 0  # group commits so far, and what they carried (for metrics and benchmarks)
        self.rows_written = 0
        self.outcomes_written = 0
        # The writer's own connection, kept across batches (no pool checkout or liveness ping per commit).
        self._conn: sa.Connection | None = None
        self._items: deque[_Item] = deque()
        # Held while the writer needs no waking; released by the first put that finds it idle.
        self._wake = threading.Lock()
        self._wake.acquire()
        self._idle = False
        # Callers blocked on a full queue (rare: queue_max outstanding items) wait here.
        self._space = threading.Condition()
        self._space_waiters = 0
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        # SUSPECT outcomes of rows whose owner gave up, written with the next batch (at most batch_max).
        self._carried: list[Recording] = []

    def start(self) -> None:
        self._last_take = self._monotonic()  # the first batch's arrivals are counted from here
        self._thread.start()

    def journal_new(self, entry: Entry, claim: Claim) -> NewRow:
        """Queues a new request; wait on the result before forwarding it."""
        row = NewRow(entry, claim)
        self._put(row, None)
        return row

    def submit(self, outcome: Outcome, claim: Claim | None, *, waited: bool = False) -> Recording:
        """Queues `outcome`; `claim` is released once it is durable. Blocks while the queue is full.
        `waited`: the caller waits for it (an answer not yet sent), so it does not linger for company
        beyond `commit_linger_s`."""
        rec = Recording(outcome, claim, waited)
        self._put(rec, None)
        return rec

    def flush(self, timeout_s: float) -> bool:
        """Waits until everything submitted so far is durable."""
        if not self._thread.is_alive():
            return not self._items
        marker = _Flush()
        if not self._put(marker, timeout_s):
            return False
        return marker.done.wait(timeout_s)

    def stop(self, timeout_s: float) -> None:
        if self._thread.is_alive():
            self._put(None, timeout_s)
            self._thread.join(timeout_s)

    def _put(self, item: _Item, timeout_s: float | None) -> bool:
        """Queues `item`, waiting while queue_max items are queued (at most `timeout_s`, None: until there
        is room). False if it timed out."""
        if len(self._items) >= self._queue_max and not self._wait_for_room(timeout_s):
            return False
        self._items.append(item)
        if self._idle:
            self._idle = False
            try:  # a plain try: contextlib.suppress builds an object per call
                self._wake.release()
            except RuntimeError:  # another put released it at the same moment
                return True
        return True

    def _wait_for_room(self, timeout_s: float | None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._space:
            self._space_waiters += 1
            try:
                while len(self._items) >= self._queue_max:
                    left = self._idle_wait_s if deadline is None else min(self._idle_wait_s,
                                                                          deadline - time.monotonic())
                    if left <= 0:
                        return False
                    self._space.wait(left)  # bounded: a missed notify costs at most idle_wait_s
                return True
            finally:
                self._space_waiters -= 1

    def _sleep_until_work(self, timeout_s: float) -> bool:
        """Sleeps until a put wakes the writer or `timeout_s` passes; True if there is work."""
        self._idle = True
        if self._items:  # queued between the caller's look and the flag: no sleep
            self._idle = False
            return True
        self._wake.acquire(timeout=timeout_s)
        self._idle = False
        return bool(self._items)

    def _take_batch(self) -> tuple[list[NewRow], list[Recording], list[_Flush], bool]:
        rows: list[NewRow] = []
        outcomes, self._carried = self._carried, []
        flushes: list[_Flush] = []
        items = self._items
        if not outcomes and not items:
            if not self._sleep_until_work(self._idle_wait_s):
                return rows, outcomes, flushes, False
            if self._company_expected():
                self._sleep(self._commit_linger_s)  # let the work arriving meanwhile share this commit
        linger_until = 0.0
        urgent = bool(outcomes)
        while True:
            while items and len(rows) + len(outcomes) < self._batch_max:
                item = items.popleft()
                if item is None:
                    self._room()
                    return rows, outcomes, flushes, True
                if isinstance(item, NewRow):
                    rows.append(item)
                    urgent = True
                elif isinstance(item, Recording):
                    outcomes.append(item)
                    urgent = urgent or item.waited
                    if not linger_until:
                        linger_until = time.monotonic() + self._linger_s
                else:
                    flushes.append(item)
                    urgent = True
            if urgent or len(rows) + len(outcomes) >= self._batch_max or not outcomes:
                break
            # Only outcomes nobody waits for (resolver outcomes): they may linger for company, woken
            # early by any new work.
            left = linger_until - time.monotonic()
            if left <= 0 or (not items and not self._sleep_until_work(left)):
                break
        self._room()
        self._note_arrivals(len(rows) + len(outcomes))
        return rows, outcomes, flushes, False

    def _company_expected(self) -> bool:
        """Whether lingering is worth it: a linger is set and, at the recent arrival rate, at least one
        more item arrives within it (unknown rate: yes)."""
        if self._commit_linger_s <= 0:
            return False
        rate = self._arrivals_per_s
        return rate is None or rate * self._commit_linger_s >= 1.0

    def _note_arrivals(self, taken: int) -> None:
        """Updates the arrival rate with a batch of `taken` items: everything that arrived since the
        previous take (ARRIVAL_WEIGHT: the newest batch's share of the average)."""
        now, last = self._monotonic(), self._last_take
        self._last_take = now
        if last is None:  # the first batch: nothing to count it from
            return
        sample = taken / max(now - last, ARRIVAL_INTERVAL_MIN_S)
        rate = self._arrivals_per_s
        self._arrivals_per_s = sample if rate is None else ARRIVAL_WEIGHT * sample + (1 - ARRIVAL_WEIGHT) * rate

    def _room(self) -> None:
        if self._space_waiters:
            with self._space:
                self._space.notify_all()

    def _run(self) -> None:
        stop = False
        while not stop or self._carried:
            rows, outcomes, flushes, stop_now = self._take_batch()
            stop = stop or stop_now
            self._write(rows, outcomes)
            for f in flushes:
                f.done.set()
        if self._conn is not None:
            try:
                self._journal.close_writer_connection(self._conn)
            except sa.exc.SQLAlchemyError:
                self._conn.invalidate()
                self._conn.close()

    def _write(self, rows: list[NewRow], outcomes: list[Recording]) -> None:
        if not rows and not outcomes:
            return
        backoff_s = 0.05
        entries, changes = [r.entry for r in rows], [o.outcome for o in outcomes]
        in_doubt = False  # an attempt failed: it may have committed all the same (its answer lost)
        mine: set[tuple[str, str]] = set()  # rows a lost attempt inserted, over all attempts
        while True:
            try:
                if self._conn is None:
                    self._conn = self._journal.open_writer_connection()
                if in_doubt:
                    # Write only what the lost attempt did not: its rows are this batch's own (inserted,
                    # so they are forwarded, not answered as a stranger's serial), and its outcomes are
                    # not applied twice (one audit line each).
                    landed, applied = self._journal.landed(entries, changes, self._conn)
                    if landed or applied:
                        log.warning("event=journal_write_landed rows=%d outcomes=%d", len(landed), len(applied))
                    mine |= landed
                    entries = [e for e in entries if e.key not in mine]
                    changes = [o for o in changes if o.key not in applied]
                inserted = (self._journal.write(entries, changes, self._conn) if entries or changes else set()) | mine
                self.transactions += 1
                self.rows_written += len(rows)
                self.outcomes_written += len(outcomes)
                break
            except sa.exc.SQLAlchemyError:
                in_doubt = True
                if self._conn is not None:
                    self._conn.invalidate()
                    self._conn.close()
                    self._conn = None
                # An operating error (journal DB down): everything stays queued and claimed; retry.
                log.exception("event=journal_write_failed rows=%d outcomes=%d retry_in_s=%.2f", len(rows),
                              len(outcomes), backoff_s)
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, WRITER_BACKOFF_CAP_S)
        for rec in outcomes:
            rec.done.set()
            if rec.claim is not None:
                self._claims.release(rec.claim)
        for r in rows:
            with r.lock:
                r.inserted = r.entry.key in inserted
                abandoned = r.abandoned
                r.done.set()
            if not abandoned:
                continue
            if r.inserted:
                self._carried.append(Recording(outcome_for(r.entry, SUSPECT, self._clock.now(),
                                                           message="journaled after its caller gave up: in doubt"),
                                               r.claim, waited=False))
            else:
                self._claims.release(r.claim)
