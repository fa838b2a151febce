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


# ---- group commit, led by the callers ----

class _Flush:
    """A marker: set once everything queued before it is durable."""
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = Latch()


class _Waitable:
    """Work a caller waits for. Its flags change only under the writer's mutex; the
    caller's `latch` is released once, when the work is durable (`is_done`) and the
    caller sleeps on it (`waiting`)."""
    __slots__ = ("_writer", "latch", "is_done", "waiting", "abandoned")

    def __init__(self, writer: JournalWriter) -> None:
        self._writer = writer
        self.latch = Latch()
        self.is_done = False
        self.waiting = False  # its caller sleeps on `latch`
        self.abandoned = False


class NewRow(_Waitable):
    """A request to journal, waited for by the thread that owns its claim.
    If that thread gives up waiting (`wait` returns False), the writer takes the
    claim over: a row inserted for nobody is recorded SUSPECT, so the resolver
    settles it (it may not be forwarded any more, but the bridge never guesses)."""
    __slots__ = ("entry", "claim", "inserted")

    def __init__(self, writer: JournalWriter, entry: Entry, claim: Claim) -> None:
        super().__init__(writer)
        self.entry = entry
        self.claim = claim
        self.inserted = False

    def wait(self, timeout_s: float) -> bool:
        """True once written (see `inserted`); False if the caller gave up (the writer now owns the claim)."""
        return self._writer._await(self, timeout_s)


class Recording(_Waitable):
    """An outcome on its way to the journal; durable once `wait` returns True."""
    __slots__ = ("outcome", "claim", "waited")

    def __init__(self, writer: JournalWriter, outcome: Outcome, claim: Claim | None, waited: bool) -> None:
        super().__init__(writer)
        self.outcome = outcome
        self.claim = claim
        self.waited = waited

    def wait(self, timeout_s: float) -> bool:
        return self._writer._await(self, timeout_s)


_Item = Recording | NewRow | _Flush | None


class JournalWriter:
    """Group commit of new rows and outcomes: one transaction (one fsync) for
    everything queued meanwhile, committed by a caller itself when the journal is
    idle and by the writer thread when it is busy.

    - A caller waiting for its work (a pay's row before it is forwarded, a definite
      outcome before it is told) commits it on its own thread, with everything
      queued, when no commit is in progress: a lone pay at open-loop rates is not
      woken at all (through the writer thread each durable step cost two thread
      wake-ups, the writer's and the caller's, 18-28 us of CPU each on this box,
      and a GIL hand-off).
    - While a commit is in progress, callers queue and sleep until their work is
      durable (one wake-up). A caller done with its commit hands the rest to the
      writer thread if anyone sleeps on it, and that thread commits back to back
      while anything is queued (a caller could continue only after being woken
      itself: measured, passing the commit from caller to caller cut throughput
      under load), then lets go.
    - The writer thread also writes the work nobody waits for (resolver outcomes,
      the SUSPECT outcome of a row whose caller gave up, flushes, stop), sweeping
      the queue every `idle_wait_s`; and a commit that failed (the journal
      database down, a connection cut mid-batch): the caller puts its batch back
      at the head of the queue and hands the commit to the writer thread, which
      retries with back-off on a new connection, and waits for it as any caller,
      bounded by its deadline (the bridge's journal_slow path). A caller with no
      time left does not start a commit. A commit that hangs (no error, no
      answer) holds its caller past its deadline, as it held the writer thread
      before; the other callers time out as before.

    An outcome's claim is released once it is durable, so a serial's next owner
    reads the recorded state. Batching by time (`commit_linger_s`, 0 = off): a
    caller starting a commit first waits that long so that what arrives meanwhile
    shares it; outcomes nobody waits for may wait up to `linger_s` for company. A
    batch holds at most `batch_max` rows and outcomes; at most `queue_max` items
    wait (callers beyond it block, bounded)."""

    def __init__(self, journal: Journal, claims: Claims, clock: Clock, *, batch_max: int, queue_max: int,
                 idle_wait_s: float, linger_s: float = 0.0, commit_linger_s: float = 0.0,
                 lead_extra_max: int = 0, sleep: Callable[[float], None] = time.sleep) -> None:
        self._journal = journal
        self._clock = clock
        self._claims = claims
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._idle_wait_s = idle_wait_s
        self._linger_s = linger_s
        self._commit_linger_s = commit_linger_s
        self._lead_extra_max = lead_extra_max
        self._sleep = sleep  # the commit linger's wait (a test sees what arrives during it)
        self.transactions = 0  # group commits so far, and what they carried (for metrics and benchmarks)
        self.rows_written = 0
        self.outcomes_written = 0
        # The journal's connection, kept across batches (no pool checkout or liveness ping per commit),
        # used only by the thread holding the commit (`_leading`).
        self._conn: sa.Connection | None = None
        # Guards the queue, the commit's ownership and every item's flags.
        self._m = threading.Lock()
        self._items: deque[_Item] = deque()
        self._leading = False  # a thread (a caller or the writer thread) holds the commit
        self._writer_turn = False  # the commit was handed to the writer thread
        # Held while the writer thread needs no waking; released by the first put that finds it idle.
        self._wake = threading.Lock()
        self._wake.acquire()
        self._idle = False
        # Callers blocked on a full queue (rare: queue_max outstanding items) wait here.
        self._space = threading.Condition(self._m)
        self._space_waiters = 0
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def journal_new(self, entry: Entry, claim: Claim) -> NewRow:
        """Queues a new request; wait on the result before forwarding it (the wait commits it)."""
        row = NewRow(self, entry, claim)
        self._put(row, None)
        return row

    def submit(self, outcome: Outcome, claim: Claim | None, *, waited: bool = False) -> Recording:
        """Queues `outcome`; `claim` is released once it is durable. Blocks while the queue is full.
        `waited`: the caller waits for it (an answer not yet sent: the wait commits it); else the writer
        thread writes it, lingering up to `linger_s` for company."""
        rec = Recording(self, outcome, claim, waited)
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

    # ---- the queue ----

    def _put(self, item: _Item, timeout_s: float | None) -> bool:
        """Queues `item`, waiting while queue_max items are queued (at most `timeout_s`, None: until there
        is room). Work a caller will wait for is left to that caller; the rest wakes the writer thread if
        no commit is in progress. False if it timed out."""
        with self._m:
            if len(self._items) >= self._queue_max and not self._wait_for_room(timeout_s):
                return False
            self._items.append(item)
            wake = self._idle and not self._leading and not (
                isinstance(item, NewRow) or (isinstance(item, Recording) and item.waited))
            if wake:
                self._idle = False
        if wake:
            self._wake_writer()
        return True

    def _wait_for_room(self, timeout_s: float | None) -> bool:
        """Under `_m`: waits (bounded) until fewer than queue_max items are queued."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
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

    def _wake_writer(self) -> None:
        try:  # a plain try: contextlib.suppress builds an object per call
            self._wake.release()
        except RuntimeError:  # released already (the thread's timed wait ended at the same moment)
            return

    # ---- a caller's wait ----

    def _await(self, item: NewRow | Recording, timeout_s: float) -> bool:
        """Until `item` is durable: commits it (and everything queued) if no commit is in progress, else
        sleeps until it is durable. False after `timeout_s` (a NewRow's claim then passes to the writer)."""
        deadline = time.monotonic() + timeout_s
        with self._m:
            if item.is_done:
                return True
            lead = not self._leading and timeout_s > 0  # with no time left, no commit is started
            if lead:
                self._leading = True
            else:
                item.waiting = True
        if lead:
            if self._commit_linger_s > 0:
                self._sleep(self._commit_linger_s)  # let the work arriving meanwhile share this commit
            if self._lead(item):
                return True
            # The commit failed; the writer thread retries it. Wait for it like any caller.
            with self._m:
                if item.is_done:
                    return True
                item.waiting = True
        while True:
            left = deadline - time.monotonic()
            if left > 0:
                item.latch.wait(left)
            with self._m:
                if item.is_done:
                    return True
                if time.monotonic() < deadline:  # cannot be: the latch is released only once durable
                    continue
                item.waiting = False
                item.abandoned = True
                wake = self._idle and not self._leading
                if wake:
                    self._idle = False
            if wake:
                self._wake_writer()
            return False

    def _lead(self, own: NewRow | Recording) -> bool:
        """This caller holds the commit: commits batches until `own` is durable, then hands the
        commit on: it first commits up to `lead_extra_max` more batches for callers sleeping on queued
        work (it is running already; the writer thread would have to be woken first). False if a commit
        failed (the writer thread then holds it)."""
        extra = 0
        while True:
            with self._m:
                rows, outcomes, flushes, stop = self._take()
                if stop and not (rows or outcomes or flushes):  # the writer thread is stopping: its turn
                    self._writer_turn = True
                    self._idle = False
                    hand_over = True
                else:
                    hand_over = False
            if hand_over:
                self._wake_writer()
                return False
            try:
                inserted = self._write_once(rows, outcomes)
            except sa.exc.SQLAlchemyError:
                log.exception("event=journal_write_failed rows=%d outcomes=%d retry=writer", len(rows), len(outcomes))
                with self._m:
                    self._requeue(rows, outcomes, flushes)
                    self._writer_turn = True
                    self._idle = False
                self._wake_writer()
                return False
            own_done, kept = self._complete(rows, outcomes, flushes, inserted, own=own,
                                            keep=extra < self._lead_extra_max)
            if own_done:
                if not kept:
                    return True
                extra += 1

    # ---- the commit ----

    def _take(self) -> tuple[list[NewRow], list[Recording], list[_Flush], bool]:
        """Under `_m`: the next batch from the head of the queue (at most batch_max rows and outcomes, up
        to a stop marker); True if a stop marker is next (left queued)."""
        rows: list[NewRow] = []
        outcomes: list[Recording] = []
        flushes: list[_Flush] = []
        items = self._items
        stop = False
        while items and len(rows) + len(outcomes) < self._batch_max:
            item = items[0]
            if item is None:
                stop = True
                break
            items.popleft()
            if isinstance(item, NewRow):
                rows.append(item)
            elif isinstance(item, Recording):
                outcomes.append(item)
            else:
                flushes.append(item)
        if self._space_waiters:
            self._space.notify_all()
        return rows, outcomes, flushes, stop

    def _requeue(self, rows: list[NewRow], outcomes: list[Recording], flushes: list[_Flush]) -> None:
        """Under `_m`: a batch that was not written goes back to the head of the queue (its order kept
        within rows and within outcomes; a flush after both, so it is set only once they are durable)."""
        self._items.extendleft(reversed([*rows, *outcomes, *flushes]))

    def _write_once(self, rows: list[NewRow], outcomes: list[Recording]) -> set[tuple[str, str]]:
        if not rows and not outcomes:
            return set()
        if self._conn is None:
            self._conn = self._journal.open_writer_connection()
        try:
            inserted = self._journal.write([r.entry for r in rows], [o.outcome for o in outcomes], self._conn)
        except sa.exc.SQLAlchemyError:
            conn, self._conn = self._conn, None
            conn.invalidate()
            conn.close()
            raise
        self.transactions += 1
        self.rows_written += len(rows)
        self.outcomes_written += len(outcomes)
        return inserted

    def _complete(self, rows: list[NewRow], outcomes: list[Recording], flushes: list[_Flush],
                  inserted: set[tuple[str, str]], *, own: NewRow | Recording | None,
                  keep: bool = False) -> tuple[bool, bool]:
        """After a commit: marks its work durable, hands the commit on (below), then wakes the callers
        whose work it carried and releases the outcomes' claims. A row whose caller gave up is recorded
        SUSPECT by the writer thread (its claim released then), or its claim released if it was
        journaled already. Returns whether `own` is durable and whether this thread keeps the commit
        (`keep`: a caller may, for callers sleeping on queued work)."""
        wake: list[Latch] = []
        release: list[Claim] = []
        with self._m:
            for rec in outcomes:
                rec.is_done = True
                if rec.waiting:
                    wake.append(rec.latch)
                if rec.claim is not None:
                    release.append(rec.claim)
            for r in rows:
                r.inserted = r.entry.key in inserted
                r.is_done = True
                if r.waiting:
                    wake.append(r.latch)
                elif r.abandoned:
                    if r.inserted:
                        self._items.appendleft(Recording(self, outcome_for(
                            r.entry, SUSPECT, self._clock.now(), message="journaled after its caller gave up: in doubt"),
                            r.claim, waited=False))
                    else:
                        release.append(r.claim)
            own_done = own is None or own.is_done
            kept = not own_done or (keep and any(isinstance(i, (NewRow, Recording)) and i.waiting
                                                 for i in self._items))
            wake_writer = not kept and self._pass_on(own is None)
        if wake_writer:
            self._wake_writer()  # first: the next commit starts while this thread wakes the others
        for latch in wake:
            latch.set()
        for f in flushes:
            f.done.set()
        for claim in release:
            self._claims.release(claim)
        return own_done, kept

    def _pass_on(self, by_writer: bool) -> bool:
        """Under `_m`, by the thread holding the commit, done with it. The writer thread keeps it while
        anything is queued (under load it commits back to back, as no caller could without being woken
        first). A caller lets it go if nothing is queued or only work whose caller has not started waiting
        (that caller will commit it); else hands it to the writer thread (True: wake it)."""
        if by_writer:
            if self._items:
                self._writer_turn = True
            else:
                self._leading = False
            return False
        for item in self._items:
            if not isinstance(item, (NewRow, Recording)) or item.waiting or item.abandoned or not (
                    isinstance(item, NewRow) or item.waited):
                self._writer_turn = True
                wake, self._idle = self._idle, False
                return wake
        self._leading = False
        return False

    # ---- the writer thread ----

    def _run(self) -> None:
        stopping = False
        lingered = False
        while True:
            with self._m:
                linger = False
                if self._writer_turn:
                    self._writer_turn = False
                    lead = True
                elif not self._leading and self._items:
                    # Outcomes nobody waits for (resolver outcomes) may wait up to linger_s for company: a
                    # caller committing meanwhile takes them along, other work wakes this thread early.
                    linger = not lingered and self._linger_s > 0 and not stopping and all(
                        isinstance(i, Recording) and not i.waited for i in self._items)
                    self._leading = lead = not linger
                    self._idle = linger
                else:
                    lead = False
                    if stopping and not self._items:
                        break
                    self._idle = True
            if not lead:
                self._wake.acquire(timeout=self._linger_s if linger else self._idle_wait_s)
                with self._m:
                    self._idle = False
                lingered = linger
                continue
            lingered = False
            stopping = self._writer_commits() or stopping
        if self._conn is not None:
            try:
                self._journal.close_writer_connection(self._conn)
            except sa.exc.SQLAlchemyError:
                self._conn.invalidate()
                self._conn.close()
            self._conn = None

    def _writer_commits(self) -> bool:
        """The writer thread holds the commit: writes batches (retrying with back-off while the journal
        database fails) until a caller can take over or nothing is left; True once it took the stop marker."""
        stopping = False
        while True:
            with self._m:
                rows, outcomes, flushes, stop = self._take()
                if stop and not rows and not outcomes and not flushes:
                    self._items.popleft()  # the stop marker: what follows it is still written
                    stopping = True
                    if not self._items:
                        self._leading = False
                        return True
                    continue
            backoff_s = 0.05
            while True:
                try:
                    inserted = self._write_once(rows, outcomes)
                    break
                except sa.exc.SQLAlchemyError:
                    # An operating error (journal DB down): everything stays queued and claimed; retry.
                    log.exception("event=journal_write_failed rows=%d outcomes=%d retry_in_s=%.2f", len(rows),
                                  len(outcomes), backoff_s)
                    time.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, WRITER_BACKOFF_CAP_S)
            self._complete(rows, outcomes, flushes, inserted, own=None)
            with self._m:
                if not self._writer_turn:  # handed to a caller, or let go
                    return stopping
                self._writer_turn = False  # still ours: work nobody waits for is queued
