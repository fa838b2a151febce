"""Several pays in one round trip and one commit on PostgreSQL (issue 11; setting pay_batch_max > 1).

Alone, a pay is one call of yd_pay in its own implicit transaction and commit (pay_pg.call_kept):
per pay a round trip, a transaction start and end, a WAL flush and the statement's executor start-up.
Here the pays of one database that wait at the same moment share them: yd_pay_many (migration
0004_paybatch_pay_many) calls yd_pay once per pay, in account order, in one transaction.

Leader and followers, no thread of its own: at most `callers_max` calls (lone pays or batches) are
in progress per database. A pay arriving when fewer are runs at once; alone when nothing waits, so
a lone pay is never delayed waiting for company (today's path, unchanged). A pay arriving when all
are busy waits in the queue. A caller finishing hands its place to the oldest waiting pay, whose
thread takes every pay queued behind it (at most `batch_max`) and issues them as one batch: each
waiting pay is woken once, either to lead or with its answer.

Every wait is bounded by the pay's own deadline: a pay still queued at its deadline leaves the queue
(UNAVAILABLE, nothing written); a batch's statements are bounded by half the shortest deadline in it
(BATCH_WAIT_SHARE), so that a batch failing on a lock wait leaves its pays time to be called alone.

When a batch fails, no pay is posted or failed for another's sake:
- the server rolled it back (a bill changed under a pay, a lock or statement timeout, a serial
  inserted concurrently, a deadlock, no kept connection free, the connection's setup failed):
  nothing was written, and every pay of it is called again alone (SINGLE), on its own thread, on the
  proven single path, with what is left of its deadline;
- the connection broke once the call was sent: every pay of it is in doubt, UNAVAILABLE
  COMMIT_IN_DOUBT, as a lone pay's would be (the bank asks GetPayment).

Must never: hold a pay past its deadline in the queue, leave a queued pay without an answer, or
answer a pay from another's outcome."""
from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Engine

from mis_adapter import pay_pg
from mis_adapter.banks import bank_day_key
from yindian_common.crash_points import crash_point
from yindian_common.db_errors import COMMIT_IN_DOUBT
from yindian_common.errors import Unavailable

R = TypeVar("R")
log = logging.getLogger("mis_adapter.pay_batch")

# A batch's statements may wait this share of the shortest deadline in it: a batch that fails on a lock
# wait leaves each of its pays the rest of its own deadline to be called alone.
BATCH_WAIT_SHARE = 0.5

# A pay taken into a batch waits for the batch's answer at most this much past its own deadline:
# the batch's statements are bounded by the shortest deadline in it, this is the answer's way back.
ANSWER_SLACK_S = 5.0


class _Single:
    """The answer "call this pay alone": its batch wrote nothing."""

    def __repr__(self) -> str:
        return "SINGLE"


SINGLE = _Single()

_QUEUED, _TAKEN, _LEAD, _DONE = range(4)


class _Waiting:
    """A pay in the batcher: what the batch call needs, its deadline, and how its thread is woken."""

    __slots__ = ("pay", "deadline", "wake", "state", "answer")

    def __init__(self, pay: pay_pg.BatchPay, deadline: float) -> None:
        self.pay = pay
        self.deadline = deadline  # time.monotonic()
        self.wake = threading.Lock()
        self.wake.acquire()
        self.state = _QUEUED
        self.answer: pay_pg.PayCalled | _Single | BaseException = SINGLE


class PayBatcher:
    """The pays of one PostgreSQL database's kept connections (pay_pg.KeptConnections), batched when they
    wait at the same moment. `callers_max` <= the kept connections' size; `batch_max` >= 2."""

    def __init__(self, kept: pay_pg.KeptConnections, *, callers_max: int, batch_max: int) -> None:
        self.kept = kept
        self.callers_max = callers_max
        self.batch_max = batch_max
        self._lock = threading.Lock()
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._callers = 0

    def pay(self, pay: pay_pg.BatchPay, *, wait_ms: int, rates: Any,
            alone: Callable[[], R]) -> R | pay_pg.PayCalled | _Single:
        """`alone()` when a place is free (the pay on its own path), else yd_pay's answer from a batch, or
        SINGLE (to be called alone: its batch wrote nothing). Raises Unavailable at its deadline while
        queued (nothing written) or when its batch is in doubt."""
        deadline = time.monotonic() + wait_ms / 1000
        with self._lock:
            if self._callers < self.callers_max:
                self._callers += 1
                me = None
            else:
                me = _Waiting(pay, deadline)
                self._queue.append(me)
        if me is None:
            try:
                return alone()
            finally:
                self._hand_on()
        if not me.wake.acquire(timeout=max(0.0, deadline - time.monotonic())):
            with self._lock:
                if me.state == _QUEUED:
                    self._queue.remove(me)
                    raise Unavailable("the call's deadline passed while it waited for the database; nothing "
                                      "was written", reason="DEADLINE_PASSED")
            # taken into a batch (or handed the lead) meanwhile: its wake comes
            if not me.wake.acquire(timeout=max(0.0, deadline - time.monotonic()) + ANSWER_SLACK_S):
                raise Unavailable(pay_pg.IN_DOUBT_TEXT, reason=COMMIT_IN_DOUBT)
        if me.state == _LEAD:
            try:
                self._lead(me, rates=rates)
            finally:
                self._hand_on()
        answer = me.answer
        if isinstance(answer, BaseException):
            raise answer
        return answer

    @property
    def waiting(self) -> int:
        """Pays queued for the next batch."""
        return len(self._queue)

    def _hand_on(self) -> None:
        """A caller finished: its place goes to the oldest waiting pay (woken to lead), or is freed."""
        with self._lock:
            if not self._queue:
                self._callers -= 1
                return
            nxt = self._queue.popleft()
            nxt.state = _LEAD
        nxt.wake.release()

    def _lead(self, me: _Waiting, *, rates: Any) -> None:
        """Calls `me` and the pays queued behind it (at most batch_max in all) as one batch, and answers
        each. Every pay taken gets an answer, whatever happens here."""
        batch = [me]
        with self._lock:
            while self._queue and len(batch) < self.batch_max:
                w = self._queue.popleft()
                w.state = _TAKEN
                batch.append(w)
        try:
            now = time.monotonic()
            live = []
            for w in batch:
                if w.deadline <= now:
                    w.answer = Unavailable("the call's deadline passed while it waited for the database; nothing "
                                           "was written", reason="DEADLINE_PASSED")
                else:
                    live.append(w)
            if live:
                left_ms = (min(w.deadline for w in live) - now) * 1000
                self._call(live, bound_ms=max(1, int(left_ms * BATCH_WAIT_SHARE)), rates=rates)
        finally:
            for w in batch:
                if w is not me:
                    w.state = _DONE
                    w.wake.release()

    def _call(self, live: list[_Waiting], *, bound_ms: int, rates: Any) -> None:
        """yd_pay_many for `live` on a kept connection; each pay's answer set (SINGLE when the batch wrote
        nothing, an in-doubt Unavailable each when its connection broke after the call was sent)."""
        for w in live:
            w.answer = SINGLE  # until the batch answers
        try:
            kept = self.kept.take()
        except Exception:  # noqa: BLE001 - the setup's trouble: each pay alone meets (and reports) its own
            return
        if kept is None:
            return
        try:
            crash_point("mis.before_commit")  # nothing of the batch sent yet
            answers = pay_pg.call_kept_many(kept, [w.pay for w in live], wait_ms=bound_ms, rates=rates)
        except pay_pg.BatchFailed as exc:
            self.kept.discard(kept)
            log.info("event=pay_batch_rolled_back pays=%d cause=%s", len(live), exc)
            return
        except Unavailable:
            self.kept.discard(kept)
            for w in live:
                w.answer = Unavailable(pay_pg.IN_DOUBT_TEXT, reason=COMMIT_IN_DOUBT)
            return
        except BaseException:
            self.kept.discard(kept)
            raise
        self.kept.give_back(kept)
        for w, answer in zip(live, answers, strict=True):
            w.answer = answer


_BATCHERS: weakref.WeakKeyDictionary[Engine, PayBatcher] = weakref.WeakKeyDictionary()
_BATCHERS_LOCK = threading.Lock()


def batcher_of(engine: Engine, kept: pay_pg.KeptConnections, *, callers_max: int, batch_max: int) -> PayBatcher:
    """The engine's batcher (made on first use, with the first caller's bounds; at most the kept
    connections' size in progress)."""
    found = _BATCHERS.get(engine)
    if found is not None:
        return found
    with _BATCHERS_LOCK:
        found = _BATCHERS.get(engine)
        if found is None:
            found = _BATCHERS[engine] = PayBatcher(kept, callers_max=max(1, min(callers_max, kept.size_max)),
                                                   batch_max=batch_max)
    return found


def batch_pay(cmd: Any, day: Any, now: Any) -> pay_pg.BatchPay:
    return pay_pg.BatchPay(cmd, day, bank_day_key(cmd.bank_id), now)
