"""In-doubt resolution and store-and-forward (DESIGN.md semantic 3).

A Pay whose answer was lost is SUSPECT. The bridge never guesses: it asks
the utility (GetPayment). POSTED: the pay succeeded, its response is kept.
REVERSED or REFUSED: not applied. NOT_FOUND: the pay is tombstoned with a
Cancel under a bridge-generated serial (REVERSAL_PREFIX + a digest of the
pay's serial, so a resend is idempotent even across a lost journal row),
resent until the utility acknowledges it (REVERSED or ORIGINAL_NOT_FOUND):
then the pay is definitively NOT_APPLIED. A Cancel whose answer was lost is
resent, idempotent by its cancel_serial, until the utility answers.

The state lives in the journal, so resolution survives restarts. One
background thread drives it (reversals before status probes, bounded batch,
exponential backoff per row with a cap); a bank core retrying an in-doubt
serial also drives it inline within its own deadline. Either way the thread
owns the serial's claim, and its outcome goes through the journal writer."""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from bridge import journal as jn
from bridge.journal import Claims, Entry, Journal, JournalWriter, Outcome
from bridge.journal.schema import in_states, requests
from bridge.upstream import DEFINITE, RETRY_LATER_CODES, Answer, Upstream
from yindian.v1 import billing_pb2
from yindian_common import business_metrics
from yindian_common.clock import Clock
from yindian_common.status import DOMAIN

log = logging.getLogger("yindian.bridge.resolver")

# Cancel serials starting with this are the bridge's own reversals; the bank core may not use it.
REVERSAL_PREFIX = "BRV-"
REVERSAL_REASON = "bridge: payment outcome unknown, reversed (冲正)"
MAX_BACKOFF_EXPONENT = 30


def _any_due_statement() -> sa.Select[Any]:
    """Whether any row is due: exactly the union of Journal.due's two selections (reversals: REVERSING
    pays, SUSPECT cancels; probes: SUSPECT and RETRYABLE pays), one row at most. Built once: an idle
    pass (nothing in doubt, the usual case, every idle_wait_s) is this one probe of
    ix_bridge_journal_state_due instead of two statements built, keyed and run (tests/bridge/
    test_resolver_idle.py compares it with Journal.due over random journals)."""
    c = requests.c
    return (sa.select(sa.literal(1)).select_from(requests)
            .where(sa.or_(sa.and_(in_states(jn.REVERSING), c.kind == jn.PAY),
                          sa.and_(in_states(jn.SUSPECT), c.kind == jn.CANCEL),
                          sa.and_(in_states(jn.SUSPECT, jn.RETRYABLE), c.kind == jn.PAY)),
                   c.next_attempt_ms <= sa.bindparam("now_ms", type_=sa.BigInteger))
            .limit(1))


ANY_DUE = _any_due_statement()


def reversal_serial(bank_id: str, bank_serial: str) -> str:
    """The tombstoning Cancel's serial for a pay: 32 characters, deterministic."""
    digest = hashlib.sha256(f"{bank_id}:{bank_serial}".encode()).hexdigest()
    return REVERSAL_PREFIX + digest[:32 - len(REVERSAL_PREFIX)]


@dataclass(frozen=True)
class Backoff:
    initial_s: float
    cap_s: float

    def delay_ms(self, attempts: int) -> int:
        return int(min(self.cap_s, self.initial_s * 2 ** min(attempts, MAX_BACKOFF_EXPONENT)) * 1000)


def now_ms(clock: Clock) -> int:
    return int(clock.now().timestamp() * 1000)


def conflict_status(message: str) -> bytes:
    """A google.rpc.Status for a serial the utility holds with other parameters."""
    info = error_details_pb2.ErrorInfo(reason="SERIAL_REUSED", domain=DOMAIN)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=grpc.StatusCode.ALREADY_EXISTS.value[0], message=message,
                             details=[detail]).SerializeToString()


class Resolver:
    """Moves in-doubt rows towards a definite state; see the module docstring."""

    def __init__(self, *, journal: Journal, writer: JournalWriter, claims: Claims, upstream: Upstream,
                 clock: Clock, bank_id: str, backoff: Backoff, batch_max: int, idle_wait_s: float,
                 call_timeout_s: float, min_call_s: float) -> None:
        self._journal = journal
        self._writer = writer
        self._claims = claims
        self._upstream = upstream
        self._clock = clock
        self._bank_id = bank_id
        self._backoff = backoff
        self._batch_max = batch_max
        self._idle_wait_s = idle_wait_s
        self._call_timeout_s = call_timeout_s
        self._min_call_s = min_call_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resolver", daemon=True)

    # ---- one row ----

    def resolve(self, entry: Entry, budget_s: float) -> Outcome:
        """Advances `entry` (in doubt, claimed by the caller) as far as `budget_s`
        allows; returns its new outcome (in doubt again, with backoff, if not definite)."""
        outcome = self._resolve(entry, budget_s)
        if entry.kind == jn.PAY:
            business_metrics.record_reversal(entry.bank_id, _reversal_label(outcome))
        return outcome

    def _resolve(self, entry: Entry, budget_s: float) -> Outcome:
        deadline = time.monotonic() + budget_s
        for _step in range(2):  # at most: probe, then tombstone
            left_s = min(deadline - time.monotonic(), self._call_timeout_s)
            if left_s < self._min_call_s:
                break
            outcome, answer = self._step(entry, left_s)
            if outcome is not None and outcome.definite:
                return outcome
            if outcome is not None and outcome.state == jn.REVERSING and entry.state != jn.REVERSING:
                entry = _advance(entry, outcome)
                continue
            return self._retry_later(entry, outcome, answer)
        return self._retry_later(entry, None, None)

    def _step(self, entry: Entry, timeout_s: float) -> tuple[Outcome | None, Answer]:
        if entry.kind == jn.CANCEL:
            req = billing_pb2.CancelRequest(cancel_serial=entry.serial, original_serial=entry.original_serial,
                                            amount_fen=entry.amount_fen, reason=entry.reason)
            answer = self._upstream.cancel(req, timeout_s)
            at = self._clock.now()
            if answer.response is not None:
                return jn.outcome_for(entry, jn.CANCELLED, at, status_code=0,
                                      body=answer.response.SerializeToString(), message="resent"), answer
            if answer.kind == DEFINITE and answer.code not in RETRY_LATER_CODES:  # else: resend later
                return jn.outcome_for(entry, jn.FAILED, at, status_code=answer.code.value[0],
                                      body=answer.status_bytes, message=answer.message), answer
            return None, answer
        if entry.state == jn.REVERSING:
            return self._tombstone(entry, timeout_s)
        return self._probe(entry, timeout_s)

    def _probe(self, entry: Entry, timeout_s: float) -> tuple[Outcome | None, Answer]:
        answer = self._upstream.get_payment(entry.serial, timeout_s)
        resp = answer.response
        if resp is None:
            return None, answer
        at = self._clock.now()
        state = resp.state
        if state == billing_pb2.PAYMENT_STATE_POSTED:
            p = resp.payment
            if (p.account_no and p.account_no != entry.account_no) or (p.amount_fen and p.amount_fen != entry.amount_fen):
                msg = f"bank_serial {entry.serial} is held by the utility with other parameters"
                return jn.outcome_for(entry, jn.FAILED, at, status_code=grpc.StatusCode.ALREADY_EXISTS.value[0],
                                      body=conflict_status(msg), message=msg), answer
            return jn.outcome_for(entry, jn.POSTED, at, status_code=0, body=p.SerializeToString(),
                                  message="resolved: posted"), answer
        if state == billing_pb2.PAYMENT_STATE_REVERSED:
            return jn.outcome_for(entry, jn.NOT_APPLIED, at, message="resolved: reversed at the utility"), answer
        if state == billing_pb2.PAYMENT_STATE_REFUSED:
            return jn.outcome_for(entry, jn.NOT_APPLIED, at, message="resolved: refused by a tombstone"), answer
        if state == billing_pb2.PAYMENT_STATE_NOT_FOUND:
            return jn.outcome_for(entry, jn.REVERSING, at, reversal_serial=reversal_serial(
                entry.bank_id, entry.serial), message="never posted: tombstoning"), answer
        raise ValueError(f"GetPayment answered an unknown state {state}")  # a contract bug, not an operating error

    def _tombstone(self, entry: Entry, timeout_s: float) -> tuple[Outcome | None, Answer]:
        serial = entry.reversal_serial or reversal_serial(entry.bank_id, entry.serial)
        req = billing_pb2.CancelRequest(cancel_serial=serial, original_serial=entry.serial,
                                        amount_fen=entry.amount_fen, reason=REVERSAL_REASON)
        answer = self._upstream.cancel(req, timeout_s)
        at = self._clock.now()
        if answer.response is not None:
            outcome_name = billing_pb2.CancelOutcome.Name(answer.response.outcome)
            return jn.outcome_for(entry, jn.NOT_APPLIED, at, reversal_serial=serial,
                                  message=f"tombstoned: {outcome_name}"), answer
        if answer.kind == DEFINITE:
            # The utility refused the reversal (e.g. the day closed): probe the payment's state again.
            return jn.outcome_for(entry, jn.SUSPECT, at, reversal_serial=serial,
                                  message=f"reversal refused: {answer.reason() or answer.code.name}"), answer
        return None, answer

    def _retry_later(self, entry: Entry, outcome: Outcome | None, answer: Answer | None) -> Outcome:
        attempts = entry.attempts + 1
        due_ms = now_ms(self._clock) + self._backoff.delay_ms(entry.attempts)
        if outcome is not None:  # a state change that is not yet definite (REVERSING refused -> SUSPECT)
            return jn.outcome_for(entry, outcome.state, outcome.at, reversal_serial=outcome.reversal_serial,
                                  message=outcome.message, attempts=attempts, next_attempt_ms=due_ms)
        why = f"{answer.code.name}: {answer.message}" if answer is not None else "no time left to try"
        return jn.outcome_for(entry, entry.state if entry.state != jn.PENDING else jn.SUSPECT, self._clock.now(),
                              message=f"still in doubt ({why})", attempts=attempts, next_attempt_ms=due_ms)

    # ---- background thread ----

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def run_pass(self) -> int:
        """One pass over the due rows; returns how many made progress (0: wait before the next pass)."""
        due_ms = now_ms(self._clock)
        if not self.any_due(due_ms):
            return 0
        keys = self._journal.due(due_ms, self._batch_max)
        advanced = 0
        for key in keys:
            if self._stop.is_set():
                break
            claim, owned = self._claims.acquire(key)
            if not owned:
                continue
            entry = self._journal.get(*key)
            if entry is None or not _resolvable(entry) or entry.next_attempt_ms > now_ms(self._clock):
                self._claims.release(claim)
                continue
            outcome = self.resolve(entry, self._call_timeout_s)
            claim.result = outcome  # waiters wake when the claim is released: once the outcome is durable
            self._writer.submit(outcome, claim)
            log.info("event=resolve kind=%s serial=%s from=%s to=%s attempts=%d detail=%r", entry.kind,
                     entry.serial, entry.state, outcome.state, outcome.attempts, outcome.message)
            if not outcome.definite and outcome.state == entry.state:
                break  # the link or the utility is down: wait, and leave the rest to their backoff
            advanced += 1
        return advanced

    def any_due(self, at_ms: int) -> bool:
        """Whether Journal.due(at_ms, ...) would return any row (see ANY_DUE)."""
        with self._journal.engine.connect() as conn:
            return conn.execute(ANY_DUE, {"now_ms": at_ms}).first() is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                advanced = self.run_pass()
            except sa.exc.SQLAlchemyError:  # journal DB unreachable: an operating error, try again later
                log.exception("event=resolver_pass_failed")
                advanced = 0
            if advanced == 0:
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()


def _resolvable(entry: Entry) -> bool:
    """In doubt, or a RETRYABLE pay due for its probe (a RETRYABLE cancel is never resent on the
    bridge's own initiative: its refusal reached the bank core, which keeps the payment standing)."""
    return entry.state in jn.IN_DOUBT_STATES or (entry.state == jn.RETRYABLE and entry.kind == jn.PAY)


def _reversal_label(outcome: Outcome) -> str:
    """How an in-doubt pay settled, for yindian_reversals_total."""
    if not outcome.definite:
        return "RETRY"
    if outcome.state == jn.POSTED:
        return "POSTED"
    if outcome.state == jn.NOT_APPLIED:
        return "REVERSED" if "REVERSED" in (outcome.message or "") else "ORIGINAL_NOT_FOUND"
    return outcome.state


def _advance(entry: Entry, outcome: Outcome) -> Entry:
    """`entry` as it will be once `outcome` is recorded (for the next step within one claim)."""
    return replace(entry, state=outcome.state, status_code=outcome.status_code, body=outcome.body,
                   message=outcome.message, reversal_serial=outcome.reversal_serial, attempts=outcome.attempts,
                   next_attempt_ms=outcome.next_attempt_ms, updated_at=outcome.at)


__all__ = ["REVERSAL_PREFIX", "Backoff", "Resolver", "reversal_serial"]
