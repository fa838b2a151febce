"""Banks as the utility sees them: who exists, who is suspended (停工), and
how many money-moving calls each may have in progress. The suspended flag is
read from the database and cached for `bank_status_ttl_s`."""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import threading
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mis_adapter.allocation import settlement_date
from mis_adapter.db.base import table_of
from mis_adapter.db.core import Bank, BankDayLock
from mis_adapter.db.recon import ReconciledDay
from yindian_common.db_errors import db_errors
from yindian_common.errors import BankSuspended, Bug, Exhausted, Forbidden

T_BANKS = table_of(Bank)
_SELECT_BANK = sa.select(T_BANKS.c.suspended, T_BANKS.c.suspended_reason).where(
    T_BANKS.c.bank_id == sa.bindparam("bank_id"))


# How long a worker waits for another's refresh of the same bank's status before reading it itself.
BANK_STATUS_WAIT_S = 2.0


class _Refresh:
    """One read of a bank's status in progress; the workers that found the entry expired meanwhile
    wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.status: tuple[bool, str] | None = None


class BankRegistry:
    def __init__(self, engine: Engine, *, ttl_s: float, concurrency_max: int) -> None:
        self._engine = engine
        self._ttl_s = ttl_s
        self._concurrency_max = concurrency_max
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, bool, str]] = {}
        self._in_flight: dict[str, int] = {}
        self._refreshing: dict[str, _Refresh] = {}

    def _status(self, bank_id: str) -> tuple[bool, str] | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(bank_id)
            if hit and now - hit[0] < self._ttl_s:
                return hit[1], hit[2]
            flight = self._refreshing.get(bank_id)
            leading = flight is None
            if flight is None:
                flight = self._refreshing[bank_id] = _Refresh()
        if not leading:
            # One refresh per bank at a time: when an entry expires under load, every worker found it
            # expired at once and each read the bank (N queries instead of one). The others take the
            # leader's answer (read after they found the entry expired, or concurrently with that);
            # if it failed or is slower than the bound, they read it themselves, as before.
            if flight.done.wait(BANK_STATUS_WAIT_S) and flight.ok:
                return flight.status
            return self._read(bank_id, now)
        try:
            flight.status = self._read(bank_id, now)
            flight.ok = True
        finally:
            with self._lock:
                del self._refreshing[bank_id]
            flight.done.set()
        return flight.status

    def _read(self, bank_id: str, now: float) -> tuple[bool, str] | None:
        # Translated here, not only at the edge: a terminated backend answers UNAVAILABLE wherever
        # the status is read (issue 9 item 6).
        # PostgreSQL: autocommit, no transaction to roll back. A ROLLBACK makes psycopg forget every
        # statement it prepared on the connection (and DEALLOCATE ALL), so this refresh, on the pool the
        # pays use, sent the next pays on that connection back to parsing and planning (pg_stat_database:
        # ~6 rollbacks/s under bench-ratio, nearly all from here); psycopg switches autocommit without a
        # round trip. Elsewhere as before: on MariaDB the switch back, as the connection returns to the
        # pool, is a round trip outside any statement, where a terminated backend surfaced as a raw
        # driver error (UNKNOWN).
        with db_errors("MIS database"), self._connect() as conn:
            row = conn.execute(_SELECT_BANK, {"bank_id": bank_id}).first()
        if row is None:
            return None
        with self._lock:
            self._cache[bank_id] = (now, bool(row.suspended), row.suspended_reason)
        return bool(row.suspended), row.suspended_reason

    def _connect(self) -> Connection:
        conn = self._engine.connect()
        if self._engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn

    def ensure_known(self, bank_id: str) -> None:
        if self._status(bank_id) is None:
            raise Forbidden(f"bank {bank_id} has no agreement with the utility", reason="UNKNOWN_BANK")

    def ensure_active(self, bank_id: str) -> None:
        status = self._status(bank_id)
        if status is None:
            raise Forbidden(f"bank {bank_id} has no agreement with the utility", reason="UNKNOWN_BANK")
        if status[0]:
            raise BankSuspended(f"bank {bank_id} is suspended by the utility (停工): {status[1]}")

    def slot(self, bank_id: str) -> _Slot:
        """`with registry.slot(bank)`: a money-moving call in progress; RESOURCE_EXHAUSTED past the bank's limit."""
        return _Slot(self, bank_id)

    def _take_slot(self, bank_id: str) -> None:
        with self._lock:
            n = self._in_flight.get(bank_id, 0)
            if n >= self._concurrency_max:
                raise Exhausted(f"bank {bank_id} has {n} calls in progress (limit {self._concurrency_max})")
            self._in_flight[bank_id] = n + 1

    def _free_slot(self, bank_id: str) -> None:
        with self._lock:
            self._in_flight[bank_id] -= 1


class _Slot:
    """BankRegistry.slot's context manager: a plain class (it wraps every Pay; contextlib's generator
    costs twice as much)."""
    __slots__ = ("_registry", "_bank_id")

    def __init__(self, registry: BankRegistry, bank_id: str) -> None:
        self._registry = registry
        self._bank_id = bank_id

    def __enter__(self) -> None:
        self._registry._take_slot(self._bank_id)

    def __exit__(self, *_exc: object) -> None:
        self._registry._free_slot(self._bank_id)


def set_suspended(engine: Engine, bank_id: str, suspended: bool, reason: str, now: dt.datetime) -> bool:
    """Operator action; returns False when the bank does not exist."""
    with engine.begin() as conn:
        n = conn.execute(sa.update(T_BANKS).where(T_BANKS.c.bank_id == bank_id).values(
            suspended=suspended, suspended_reason=reason if suspended else "", updated_at=now)).rowcount
    return n == 1


# ---- the bank-day lock: reconciliation against payments of the day being closed ----
# Every transaction that posts or reverses a bank's payment takes this lock
# SHARED before any account lock; reconciliation takes it EXCLUSIVE before it
# reads the day. So a payment either commits before the day is matched (and is
# matched), or sees the closed day and settles on the next one. Same order
# everywhere (bank-day, then accounts): no deadlock between the two.
# PostgreSQL: a transaction-scoped advisory lock (in memory, no row write);
# MariaDB: a shared/exclusive lock on the bank's row in bank_day_locks (made on
# first use in each database: branch databases hold no banks rows); SQLite: writers are
# serialized already.
T_RECON = table_of(ReconciledDay)
_CLOSED_DAYS = sa.select(T_RECON.c.settlement_date).where(
    T_RECON.c.bank_id == sa.bindparam("bank_id"), T_RECON.c.settlement_date.in_(sa.bindparam("days", expanding=True)))
_ADVISORY_SHARED = sa.text("SELECT pg_advisory_xact_lock_shared(:k)")
_ADVISORY_EXCLUSIVE = sa.text("SELECT pg_advisory_xact_lock(:k)")
T_DAY_LOCKS = table_of(BankDayLock)
_ROW_SHARED = sa.select(T_DAY_LOCKS.c.bank_id).where(
    T_DAY_LOCKS.c.bank_id == sa.bindparam("bank_id")).with_for_update(read=True)
_ROW_EXCLUSIVE = sa.select(T_DAY_LOCKS.c.bank_id).where(
    T_DAY_LOCKS.c.bank_id == sa.bindparam("bank_id")).with_for_update()
_MAKE_ROW = T_DAY_LOCKS.insert().prefix_with("IGNORE").values(bank_id=sa.bindparam("bank_id"))


BANK_DAY_KEYS_CACHED_MAX = 4_096


@functools.lru_cache(maxsize=BANK_DAY_KEYS_CACHED_MAX)
def bank_day_key(bank_id: str) -> int:
    """The PostgreSQL advisory-lock key of a bank's bank-day lock."""
    return _advisory_key(bank_id)


def _advisory_key(bank_id: str) -> int:
    digest = hashlib.sha256(f"yindian-bank-day:{bank_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_bank_day(conn: Connection, bank_id: str, *, exclusive: bool = False) -> None:
    """Take the bank-day lock in the caller's transaction (see above)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.execute(_ADVISORY_EXCLUSIVE if exclusive else _ADVISORY_SHARED, {"k": bank_day_key(bank_id)})
    elif dialect != "sqlite":
        lock = _ROW_EXCLUSIVE if exclusive else _ROW_SHARED
        if conn.execute(lock, {"bank_id": bank_id}).first() is None:
            # First use in this database: a lock on a missing row locks nothing. The made row is held
            # exclusive until this transaction ends (the bank's other first users wait for it, once);
            # INSERT IGNORE waits on a concurrent maker's uncommitted row, so all lock the same row.
            conn.execute(_MAKE_ROW, {"bank_id": bank_id})
            if conn.execute(lock, {"bank_id": bank_id}).first() is None:
                raise Bug(f"bank-day lock row of {bank_id} missing after it was made")


def settlement_day(conn: Connection, bank_id: str, today: dt.date) -> dt.date:
    """The settlement date of a payment (or refund) posted today (allocation.settlement_date),
    from the bank's reconciled days and its sign-off (日终签退, mis_adapter.link_state).
    Call it after lock_bank_day."""
    from mis_adapter import link_state  # link_state reads the bank rows this module owns

    closed = {r.settlement_date for r in conn.execute(_CLOSED_DAYS, {"bank_id": bank_id,
                                                                    "days": [today, today + dt.timedelta(days=1)]})}
    return settlement_date(today, today_reconciled=today in closed,
                           next_reconciled=today + dt.timedelta(days=1) in closed,
                           signed_off=link_state.signed_off_on(conn, bank_id, today))
