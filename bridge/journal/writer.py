"""In-process ownership of serials (`Claims`) and the group-commit writer
thread that journals new rows and records outcomes in batches."""
from __future__ import annotations

import logging
import queue
import threading
import time
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


class JournalWriter:
    """Writes new rows and outcomes in group commits on one thread: one
    transaction (one fsync) for everything that queued up meanwhile. An
    outcome's claim is released once it is durable, so a serial's next owner
    reads the recorded state."""

    def __init__(self, journal: Journal, claims: Claims, clock: Clock, *, batch_max: int, queue_max: int,
                 idle_wait_s: float, linger_s: float = 0.0) -> None:
        self._journal = journal
        self._clock = clock
        self._claims = claims
        self._batch_max = batch_max
        self._idle_wait_s = idle_wait_s
        self._linger_s = linger_s
        self.transactions = 0  # group commits so far, and what they carried (for metrics and benchmarks)
        self.rows_written = 0
        self.outcomes_written = 0
        # The writer's own connection, kept across batches (no pool checkout or liveness ping per commit).
        self._conn: sa.Connection | None = None
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_max)
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        # SUSPECT outcomes of rows whose owner gave up, written with the next batch (at most batch_max).
        self._carried: list[Recording] = []

    def start(self) -> None:
        self._thread.start()

    def journal_new(self, entry: Entry, claim: Claim) -> NewRow:
        """Queues a new request; wait on the result before forwarding it."""
        row = NewRow(entry, claim)
        self._queue.put(row)
        return row

    def submit(self, outcome: Outcome, claim: Claim | None, *, waited: bool = False) -> Recording:
        """Queues `outcome`; `claim` is released once it is durable. Blocks while the queue is full.
        `waited`: the caller waits for it (an answer not yet sent), so it is written at once, not lingering."""
        rec = Recording(outcome, claim, waited)
        self._queue.put(rec)
        return rec

    def flush(self, timeout_s: float) -> bool:
        """Waits until everything submitted so far is durable."""
        if not self._thread.is_alive():
            return self._queue.empty()
        marker = _Flush()
        self._queue.put(marker, timeout=timeout_s)
        return marker.done.wait(timeout_s)

    def stop(self, timeout_s: float) -> None:
        if self._thread.is_alive():
            self._queue.put(None, timeout=timeout_s)
            self._thread.join(timeout_s)

    def _take_batch(self) -> tuple[list[NewRow], list[Recording], list[_Flush], bool]:
        rows: list[NewRow] = []
        outcomes, self._carried = self._carried, []
        flushes: list[_Flush] = []
        wait_s = self._idle_wait_s if not outcomes else 0.0
        linger_until = 0.0
        urgent = False
        while len(rows) + len(outcomes) < self._batch_max:
            try:
                item = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return rows, outcomes, flushes, True
            if isinstance(item, _Flush):
                flushes.append(item)
            elif isinstance(item, NewRow):
                rows.append(item)
            else:
                outcomes.append(item)
                urgent = urgent or item.waited
                if not linger_until:
                    linger_until = time.monotonic() + self._linger_s
            # Outcomes nobody waits for (resolver outcomes) may linger for company; a new row, a
            # flush or an outcome whose answer waits is written with whatever has queued meanwhile.
            wait_s = 0.0 if rows or flushes or urgent else linger_until - time.monotonic()
        return rows, outcomes, flushes, False

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
        while True:
            try:
                if self._conn is None:
                    self._conn = self._journal.open_writer_connection()
                inserted = self._journal.write([r.entry for r in rows], [o.outcome for o in outcomes], self._conn)
                self.transactions += 1
                self.rows_written += len(rows)
                self.outcomes_written += len(outcomes)
                break
            except sa.exc.SQLAlchemyError:
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
