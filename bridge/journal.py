"""The bridge's own journal: one row per money-moving request (Pay keyed by
bank_serial, Cancel keyed by cancel_serial) with its parameters, its state
and the utility's answer once definite, plus an append-only audit of every
outcome. The row is written before the request crosses the link, so no
payment the bridge forwarded can be forgotten; an outcome is recorded after.

Cost (BASELINES.md): one INSERT (insert-or-ignore, prebuilt) per request on
the caller's thread, and outcomes recorded by one writer thread in group
commits (one UPDATE + one audit INSERT per outcome, many per transaction).
Recording an outcome after answering the bank core is safe: a row still
PENDING after a crash is in doubt and is resolved at the utility, never
guessed.

States of a row:
    PENDING      forwarded (or about to be), answer not yet recorded
    POSTED       Pay applied; `body` is the utility's PayResponse
    CANCELLED    Cancel acknowledged; `body` is the utility's CancelResponse
    FAILED       the utility answered a definite error; `body` is its google.rpc.Status
    RETRYABLE    the utility refused for now and wrote nothing (RESOURCE_EXHAUSTED,
                 UNAVAILABLE, ABORTED with ErrorInfo); a retry of the serial is sent again
    SUSPECT      outcome unknown: a Pay awaits GetPayment, a Cancel awaits resending
    REVERSING    a Pay the utility never posted: a tombstoning Cancel
                 (`reversal_serial`) is sent until acknowledged
    NOT_APPLIED  a Pay that is definitively not applied (reversed, refused, tombstoned)

One bridge process owns a journal: in-process claims (`Claims`) make sure one
thread at a time acts on a serial. This module must never call the utility."""
from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from yindian_common.clock import Clock
from yindian_common.db import require_case_sensitive_serials

log = logging.getLogger("yindian.bridge.journal")

PAY = "PAY"
CANCEL = "CANCEL"

PENDING = "PENDING"
POSTED = "POSTED"
CANCELLED = "CANCELLED"
FAILED = "FAILED"
RETRYABLE = "RETRYABLE"
SUSPECT = "SUSPECT"
REVERSING = "REVERSING"
NOT_APPLIED = "NOT_APPLIED"

DEFINITE_STATES = frozenset({POSTED, CANCELLED, FAILED, NOT_APPLIED})
IN_DOUBT_STATES = frozenset({PENDING, SUSPECT, REVERSING})

MESSAGE_MAX = 256
WRITER_BACKOFF_CAP_S = 5.0

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TZ = sa.DateTime(timezone=True)

metadata = sa.MetaData()

requests = sa.Table(
    "bridge_journal", metadata,
    sa.Column("kind", sa.String(6), primary_key=True),
    sa.Column("serial", sa.String(32), primary_key=True),
    sa.Column("bank_id", sa.String(16), nullable=False),
    sa.Column("account_no", sa.String(10), nullable=False, default=""),
    sa.Column("original_serial", sa.String(32), nullable=False, default=""),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    sa.Column("outlet_code", sa.String(16), nullable=False, default=""),
    sa.Column("teller_id", sa.String(16), nullable=False, default=""),
    sa.Column("channel", sa.Integer, nullable=False, default=0),
    sa.Column("bank_balance_fen", sa.BigInteger, nullable=True),
    sa.Column("reason", sa.String(128), nullable=False, default=""),
    sa.Column("state", sa.String(12), nullable=False),
    # gRPC status code of the definite answer (0 = OK)
    sa.Column("status_code", sa.Integer, nullable=True),
    # PayResponse / CancelResponse bytes when OK, google.rpc.Status bytes when FAILED
    sa.Column("body", sa.LargeBinary, nullable=True),
    sa.Column("message", sa.String(MESSAGE_MAX), nullable=False, default=""),
    sa.Column("reversal_serial", sa.String(32), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    # epoch milliseconds: compared the same way on every back end
    sa.Column("next_attempt_ms", sa.BigInteger, nullable=False, default=0),
    sa.Column("business_date", sa.Date, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    sa.Index("ix_bridge_journal_state_due", "state", "next_attempt_ms"),
    sa.Index("ix_bridge_journal_day_state", "business_date", "state"),
    sa.Index("ix_bridge_journal_original", "original_serial"),
)

audit = sa.Table(
    "bridge_audit", metadata,
    sa.Column("audit_id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", TZ, nullable=False),
    sa.Column("kind", sa.String(6), nullable=False),
    sa.Column("serial", sa.String(32), nullable=False),
    sa.Column("bank_id", sa.String(16), nullable=False),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(12), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("detail", sa.String(MESSAGE_MAX), nullable=False, default=""),
    sa.Index("ix_bridge_audit_serial", "kind", "serial"),
)

_COLUMNS = [c.name for c in requests.columns]


@dataclass(frozen=True)
class Entry:
    """One journal row."""
    kind: str
    serial: str
    bank_id: str
    amount_fen: int
    state: str
    business_date: dt.date
    created_at: dt.datetime
    updated_at: dt.datetime
    account_no: str = ""
    original_serial: str = ""
    outlet_code: str = ""
    teller_id: str = ""
    channel: int = 0
    bank_balance_fen: int | None = None
    reason: str = ""
    status_code: int | None = None
    body: bytes | None = None
    message: str = ""
    reversal_serial: str | None = None
    attempts: int = 0
    next_attempt_ms: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.serial)

    def same_request(self, other: Entry) -> bool:
        """Same parameters (the idempotency rule): only what the bank core sent counts."""
        return (self.kind == other.kind and self.serial == other.serial
                and self.account_no == other.account_no and self.original_serial == other.original_serial
                and self.amount_fen == other.amount_fen and self.outlet_code == other.outlet_code
                and self.teller_id == other.teller_id and self.channel == other.channel
                and self.bank_balance_fen == other.bank_balance_fen and self.reason == other.reason)

    def row(self) -> dict[str, Any]:
        out = {c: getattr(self, c) for c in _COLUMNS}
        out["created_at"], out["updated_at"] = utc(self.created_at), utc(self.updated_at)
        return out


@dataclass(frozen=True)
class Outcome:
    """A state change of one row, and its audit line."""
    kind: str
    serial: str
    bank_id: str
    amount_fen: int
    state: str
    at: dt.datetime
    status_code: int | None = None
    body: bytes | None = None
    message: str = ""
    reversal_serial: str | None = None
    attempts: int = 0
    next_attempt_ms: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.serial)

    @property
    def definite(self) -> bool:
        return self.state in DEFINITE_STATES


def utc(value: dt.datetime) -> dt.datetime:
    """Instants are stored in UTC (SQLite and MariaDB keep only the wall time)."""
    return value.astimezone(dt.UTC)


def outcome_for(entry: Entry, state: str, at: dt.datetime, **changes: Any) -> Outcome:
    """The outcome of `entry` moving to `state`, keeping what is not changed."""
    base: dict[str, Any] = {"status_code": entry.status_code, "body": entry.body, "message": entry.message,
                            "reversal_serial": entry.reversal_serial, "attempts": entry.attempts,
                            "next_attempt_ms": entry.next_attempt_ms}
    base.update(changes)
    base["message"] = str(base["message"])[:MESSAGE_MAX]
    return Outcome(kind=entry.kind, serial=entry.serial, bank_id=entry.bank_id, amount_fen=entry.amount_fen,
                   state=state, at=at, **base)


def create_schema(engine: Engine) -> None:
    require_case_sensitive_serials(engine)
    metadata.create_all(engine)


def _insert_ignoring_duplicates(dialect: str) -> sa.Insert:
    stmt = requests.insert()
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        return pg_insert(requests).on_conflict_do_nothing(index_elements=["kind", "serial"])
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        return sqlite_insert(requests).on_conflict_do_nothing(index_elements=["kind", "serial"])
    # MariaDB/MySQL: values were validated against the column sizes, so IGNORE can only skip the duplicate.
    return stmt.prefix_with("IGNORE")


class Journal:
    """Repository over the journal tables, statements built once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # rowcount tells a new serial from a journaled one (SQLAlchemy keeps it for INSERT only on request).
        self._insert = _insert_ignoring_duplicates(engine.dialect.name).execution_options(preserve_rowcount=True)
        self._insert_plain = requests.insert()
        self._existing = sa.select(requests.c.serial).where(
            requests.c.kind == sa.bindparam("k"), requests.c.serial.in_(sa.bindparam("s", expanding=True)))
        self._select = sa.select(requests).where(requests.c.kind == sa.bindparam("k"),
                                                 requests.c.serial == sa.bindparam("s"))
        self._update = requests.update().where(
            requests.c.kind == sa.bindparam("b_kind"), requests.c.serial == sa.bindparam("b_serial")
        ).values(state=sa.bindparam("state"), status_code=sa.bindparam("status_code"), body=sa.bindparam("body"),
                 message=sa.bindparam("message"), reversal_serial=sa.bindparam("reversal_serial"),
                 attempts=sa.bindparam("attempts"), next_attempt_ms=sa.bindparam("next_attempt_ms"),
                 updated_at=sa.bindparam("updated_at"))
        self._audit = audit.insert()
        self._cancels_of = sa.select(requests).where(requests.c.kind == CANCEL,
                                                     requests.c.original_serial == sa.bindparam("o"))

    def insert_new(self, entry: Entry) -> bool:
        """Journals a new request durably; False when the serial is already journaled."""
        with self.engine.begin() as conn:
            return conn.execute(self._insert, entry.row()).rowcount == 1

    def get(self, kind: str, serial: str) -> Entry | None:
        with self.engine.connect() as conn:
            row = conn.execute(self._select, {"k": kind, "s": serial}).mappings().first()
        return Entry(**row) if row is not None else None

    def write(self, entries: Sequence[Entry], outcomes: Sequence[Outcome],
              conn: sa.Connection | None = None) -> set[tuple[str, str]]:
        """One transaction (on `conn` if given): new rows (keys distinct; serials
        already journaled are left alone) and outcomes with their audit lines.
        Returns the keys inserted. Only the journal writer thread inserts, so
        nothing can slip in between the lookup and the insert."""
        if conn is None:
            with self.engine.connect() as own:
                return self.write(entries, outcomes, own)
        inserted: set[tuple[str, str]] = set()
        with conn.begin():
            if entries:
                existing: set[tuple[str, str]] = set()
                for kind in {e.kind for e in entries}:
                    serials = [e.serial for e in entries if e.kind == kind]
                    existing.update((kind, r[0]) for r in conn.execute(self._existing, {"k": kind, "s": serials}))
                new = [e for e in entries if e.key not in existing]
                if new:
                    conn.execute(self._insert_plain, [e.row() for e in new])
                inserted = {e.key for e in new}
            if outcomes:
                self._record_in(conn, outcomes)
        return inserted

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """One transaction: every row's new state plus its audit line."""
        if not outcomes:
            return
        with self.engine.begin() as conn:
            self._record_in(conn, outcomes)

    def _record_in(self, conn: sa.Connection, outcomes: Sequence[Outcome]) -> None:
        updates = [{"b_kind": o.kind, "b_serial": o.serial, "state": o.state, "status_code": o.status_code,
                    "body": o.body, "message": o.message, "reversal_serial": o.reversal_serial,
                    "attempts": o.attempts, "next_attempt_ms": o.next_attempt_ms, "updated_at": utc(o.at)}
                   for o in outcomes]
        lines = [{"at": utc(o.at), "kind": o.kind, "serial": o.serial, "bank_id": o.bank_id,
                  "amount_fen": o.amount_fen, "state": o.state, "status_code": o.status_code,
                  "detail": o.message} for o in outcomes]
        conn.execute(self._update, updates)
        conn.execute(self._audit, lines)

    def cancels_of(self, original_serial: str) -> list[Entry]:
        """The journaled Cancels of a pay (a replayed pay that was reversed is refused)."""
        with self.engine.connect() as conn:
            rows = conn.execute(self._cancels_of, {"o": original_serial}).mappings().all()
        return [Entry(**r) for r in rows]

    def recover_orphans(self, at: dt.datetime) -> int:
        """At start-up no request is in flight: every PENDING row lost its answer
        in a crash and becomes SUSPECT, due at once. Returns how many."""
        at = utc(at)
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(requests.c.kind, requests.c.serial, requests.c.bank_id,
                                          requests.c.amount_fen).where(requests.c.state == PENDING)).all()
            if not rows:
                return 0
            conn.execute(requests.update().where(requests.c.state == PENDING)
                         .values(state=SUSPECT, next_attempt_ms=0, updated_at=at))
            conn.execute(self._audit, [{"at": at, "kind": r.kind, "serial": r.serial, "bank_id": r.bank_id,
                                        "amount_fen": r.amount_fen, "state": SUSPECT, "status_code": None,
                                        "detail": "pending at start-up: answer lost"} for r in rows])
        return len(rows)

    def due(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        """Keys of in-doubt rows due for another attempt: reversals first
        (REVERSING pays, SUSPECT cancels), then status probes of SUSPECT pays."""
        c = requests.c
        reversals = (sa.select(c.kind, c.serial)
                     .where(sa.or_(sa.and_(c.state == REVERSING, c.kind == PAY),
                                   sa.and_(c.state == SUSPECT, c.kind == CANCEL)),
                            c.next_attempt_ms <= now_ms)
                     .order_by(c.next_attempt_ms).limit(limit))
        probes = (sa.select(c.kind, c.serial)
                  .where(c.state == SUSPECT, c.kind == PAY, c.next_attempt_ms <= now_ms)
                  .order_by(c.next_attempt_ms).limit(limit))
        with self.engine.connect() as conn:
            keys = [(r.kind, r.serial) for r in conn.execute(reversals)]
            if len(keys) < limit:
                keys += [(r.kind, r.serial) for r in conn.execute(probes.limit(limit - len(keys)))]
        return keys

    def in_doubt_count(self, business_date: dt.date) -> int:
        c = requests.c
        stmt = sa.select(sa.func.count()).select_from(requests).where(
            c.business_date == business_date, c.state.in_(sorted(IN_DOUBT_STATES)))
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def counts_by_state(self) -> dict[str, int]:
        stmt = sa.select(requests.c.state, sa.func.count()).group_by(requests.c.state)
        with self.engine.connect() as conn:
            return {r[0]: int(r[1]) for r in conn.execute(stmt)}

    def audit_lines(self, kind: str, serial: str) -> list[dict[str, Any]]:
        stmt = (sa.select(audit).where(audit.c.kind == kind, audit.c.serial == serial)
                .order_by(audit.c.audit_id))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]


# ---- in-process ownership of serials ----

@dataclass
class Claim:
    """One thread's ownership of a serial. Waiters read `result` once `done` is set."""
    key: tuple[str, str]
    done: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
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
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class NewRow:
    """A request to journal, waited for by the thread that owns its claim.
    If that thread gives up waiting (`abandon`), the writer takes the claim
    over: a row it inserted for nobody is recorded SUSPECT, so the resolver
    settles it (it may not be forwarded any more, but the bridge never guesses)."""
    entry: Entry
    claim: Claim
    done: threading.Event = field(default_factory=threading.Event)
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


_Item = tuple[Outcome, Claim | None] | NewRow | _Flush | None


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
        self._carried: list[tuple[Outcome, Claim | None]] = []

    def start(self) -> None:
        self._thread.start()

    def journal_new(self, entry: Entry, claim: Claim) -> NewRow:
        """Queues a new request; wait on the result before forwarding it."""
        row = NewRow(entry, claim)
        self._queue.put(row)
        return row

    def submit(self, outcome: Outcome, claim: Claim | None) -> None:
        """Queues `outcome`; `claim` is released once it is durable. Blocks while the queue is full."""
        self._queue.put((outcome, claim))

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

    def _take_batch(self) -> tuple[list[NewRow], list[tuple[Outcome, Claim | None]], list[_Flush], bool]:
        rows: list[NewRow] = []
        outcomes, self._carried = self._carried, []
        flushes: list[_Flush] = []
        wait_s = self._idle_wait_s if not outcomes else 0.0
        linger_until = 0.0
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
                if not linger_until:
                    linger_until = time.monotonic() + self._linger_s
            # Outcomes alone may linger for company (their callers were already answered);
            # a new row or a flush is written at once.
            wait_s = 0.0 if rows or flushes else linger_until - time.monotonic()
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
            self._conn.close()

    def _write(self, rows: list[NewRow], outcomes: list[tuple[Outcome, Claim | None]]) -> None:
        if not rows and not outcomes:
            return
        backoff_s = 0.05
        while True:
            try:
                if self._conn is None:
                    self._conn = self._journal.engine.connect()
                inserted = self._journal.write([r.entry for r in rows], [o for o, _ in outcomes], self._conn)
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
        for _outcome, claim in outcomes:
            if claim is not None:
                self._claims.release(claim)
        for r in rows:
            with r.lock:
                r.inserted = r.entry.key in inserted
                abandoned = r.abandoned
                r.done.set()
            if not abandoned:
                continue
            if r.inserted:
                self._carried.append((outcome_for(r.entry, SUSPECT, self._clock.now(), message="journaled after its caller "
                                                  "gave up: in doubt"), r.claim))
            else:
                self._claims.release(r.claim)
