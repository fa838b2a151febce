"""Arrears snapshots: the bills in arrears at the end of a closed day S, taken once by a job, so
that an arrears report for S or any later date reads them (O(bills in arrears at S) narrow rows)
instead of every bill (reports._arrears_bills with snap). A report for a date before the oldest
snapshot reconstructs from every bill, as before.

What a snapshot holds (db/arrears.py, format SNAPSHOT_FORMAT): every bill in arrears at the end of S
(of those up to `bills_upto`) as it stood then, reconstructed from history by the reports' own
reconstruction as of S (reports._arrears_bills): principal unpaid, the fee accrued through S (with
the late-fee rates recorded in the header) and the fee paid by then. `bills_upto`: the largest bill
id when it was taken, lowered below the first bill issued after the end of S, so that every bill at
or below it was issued by then. A report for D >= S reads those rows, replaying from history only the
bills whose allocations changed effect in (S, D] (found from the payments by their indexes: a range
of days) and reading the bills above bills_upto from bills (reports._touched_since_snapshot), so it is
exact for every D >= S as long as nothing dated on or before S is written after the snapshot: a bill
touched only after D keeps its state at S, which was its state at D. Its accruals embed the rates
(a report with other rates ignores it) and the customer's tariff class (no writer changes a
customer's tariff; one that did would have to drop the snapshots).

Why nothing dated on or before S is written after it (the argument; each writer takes its business
day from the injectable clock, business_date):
- Pay, Cancel, feed posting, refunds settle on their business day or the next (settlement_day)
  and reverse on their business day (payments._REVERSE_PAYMENT): a transaction that starts after
  the business day has passed S writes nothing dated on or before S. The job takes a snapshot of
  S only once `now` is ARREARS_SNAPSHOT_MARGIN_S past the end of S (a writer reads its business day
  just before its transaction starts), and it reads the bills only after every transaction that
  was open when it read `bills_upto` has ended (_settle), so every writer that may have read a
  business day on or before S has committed or rolled back by then, and its bills are at or
  below bills_upto.
- Issuance stamps a run's bills with the run's start (issue_bills): a batch committed after the
  job read the largest bill id has larger bill ids (ids grow with each insert), and the report reads
  every bill above bills_upto whatever its issue time; a bill at or below the largest id that was
  issued after S (between the end of S and the job) lowers bills_upto below it.
- A reconciliation of a day on or before S (BANK_ONLY posts, UTILITY_ONLY reversals, dated that
  day) can come at any time. It inserts that day's reconciled_days row in the same transaction;
  the snapshot keeps the count of those rows dated on or before S from when it was taken, and a
  report whose own count differs ignores the snapshot (reports._snapshot_of), as does the job,
  which drops it (prune).

When: automatically, by `mis_adapter serve` (SnapshotJob, every arrears_snapshot_interval_s, default
600 s; 0 turns it off): once the last bank has reconciled a day (the day's close) and the day has been
over for ARREARS_SNAPSHOT_MARGIN_S, the next pass takes it. By hand: `python -m mis_adapter
arrears-snapshot` (an operator or an outside scheduler; --day for a given day). Without --day the day is
the newest day every bank that has ever reconciled has reconciled (so that no reconciliation of it is
still to come), and not today. The reports never write: a missing snapshot only makes a report slower,
never different.

Concurrency: the header row (state BUILDING) is inserted and committed first (its key is the day:
a second job for the day stops), the bills are one INSERT ... SELECT (no rows through Python;
MariaDB reads them as a consistent read, READ COMMITTED, so no row a Pay writes is locked), then
the header becomes READY in the same transaction. Reports read in one snapshot of the database
(reports._report_connection), so a snapshot dropped while a report reads it is still whole for
that report.

Retention (prune, after every build; Retention, from the settings arrears_snapshots_keep_days and
arrears_snapshot_month_ends_keep or the command's --keep-days and --keep-month-ends): the newest
ARREARS_SNAPSHOTS_KEEP_DAYS snapshots, and the snapshots of month ends among the newest
ARREARS_SNAPSHOT_MONTH_ENDS_KEEP month ends (past-date
reports read the newest snapshot on or before their date); every other snapshot, every one no
longer exact, and every BUILDING header older than ARREARS_SNAPSHOT_BUILD_STALE_S are dropped:
first marked DROPPING (no report chooses it), then its bills deleted ARREARS_SNAPSHOT_DELETE_ROWS
bill ids at a time, then the header."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from mis_adapter.db.arrears import BUILDING, READY, SNAPSHOT_FORMAT
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.late_fee_sql import accrued_micro_sql
from mis_adapter.reports import (
    _SNAP_DAY,
    T_ALLOC,
    T_BILL,
    T_CUST,
    T_PAY,
    T_RECON,
    T_SNAP,
    T_SNAP_BILL,
    _arrears_bills,
    _materialised,
    _no_jit,
    end_of_day_utc,
    rates_key,
)
from yindian_common.clock import Clock, business_date
from yindian_common.errors import InvalidField

log = logging.getLogger("mis_adapter.arrears_snapshot")

# ---- bounds ----
ARREARS_SNAPSHOT_MARGIN_S = 600          # a day's snapshot is taken no sooner than this after the day ends
ARREARS_SNAPSHOT_SETTLE_WAIT_S = 300.0   # longest wait for the transactions open when bills_upto was read
ARREARS_SNAPSHOT_POLL_S = 0.2            # how often that wait looks again
ARREARS_SNAPSHOTS_KEEP_DAYS = 7          # newest snapshots kept
ARREARS_SNAPSHOT_MONTH_ENDS_KEEP = 13    # month-end snapshots kept (past-date reports)
ARREARS_SNAPSHOT_DELETE_ROWS = 50_000    # bill ids per DELETE when a snapshot is dropped
ARREARS_SNAPSHOT_BUILD_STALE_S = 6 * 3600  # a BUILDING header older than this is a job that died
ARREARS_SNAPSHOT_STOP_S = 5.0           # longest wait for serve's job to end when the process stops
ARREARS_SNAPSHOT_COPY_ROWS = 20_000      # SQLite: snapshot rows per write transaction (a pay waits at most one)
DROPPING = "DROPPING"

_b = sa.bindparam
_DAY = _b("day", type_=sa.Date)
_MAX_BILL = sa.select(sa.func.coalesce(sa.func.max(T_BILL.c.bill_id), 0))
_RECONCILED_UPTO = (sa.select(sa.func.count()).select_from(T_RECON)
                    .where(T_RECON.c.settlement_date <= _DAY))
_HEADER = sa.select(T_SNAP).where(T_SNAP.c.as_of == _DAY)
_HEADERS = sa.select(T_SNAP).order_by(T_SNAP.c.as_of.desc())
_NEWEST_CLOSED = (sa.select(sa.func.min(sa.select(sa.func.max(T_RECON.c.settlement_date)).group_by(T_RECON.c.bank_id)
                                        .subquery().c[0])))


_FIRST_ISSUED_AFTER = (sa.select(sa.func.min(T_BILL.c.bill_id))
                       .where(T_BILL.c.issued_at >= _b("issued_before"),
                              T_BILL.c.bill_id <= _b("max_bill", type_=sa.BigInteger)))
_SNAP_COLUMNS = ["as_of", "bill_id", "account_no", "period", "unpaid_fen", "accrual_micro", "accrual_date",
                 "late_fee_paid_fen", "replay_ok"]


@functools.lru_cache(maxsize=8)
def _insert_rows(rates: LateFeeRates, dialect: str, into: str | None = None) -> Any:
    """The snapshot's rows of day :snap_day: every bill up to :bills_upto in arrears at its end, as the
    reconstruction at that day prices it (reports._arrears_bills with as_of the day, fee_state): principal
    unpaid, the accrual through the day, and the fee paid by then. The accrual continues from the later of
    the day and the bill's due date (late_fee.accrued_micro is additive over consecutive spans of days, so
    accruing on from there to a later date D gives the accrual through D). replay_ok: the bill had no
    allocation settled by the day and its accrual is the replay's (db/arrears.py): a report for D keeps
    its state at the day even when a payment after D touched it (the reconstruction as of D replays such
    a bill from its issue, and gets the same); any other bill so touched it replays
    (reports._touched_since_snapshot)."""
    u, b, c = _arrears_bills(False, rates, dialect, fee_state=True), T_BILL, T_CUST
    a, p = T_ALLOC.alias("early_alloc"), T_PAY.alias("early_pay")
    early = (sa.select(a.c.bill_id).select_from(a.join(p, p.c.payment_id == a.c.payment_id))
             .where(a.c.bill_id == u.c.bill_id, p.c.settlement_date <= _SNAP_DAY))
    # the replay from issue of a bill with no allocation settled by the day: its principal unpaid then
    # (what migrated history paid counts from the start) accrued from its due date
    replayed = accrued_micro_sql(principal=u.c.unpaid_fen, from_date=b.c.due_date, to_date=_SNAP_DAY,
                                 tariff_class=c.c.tariff_class, period=u.c.period, rates=rates)
    replay_ok = sa.and_(~sa.exists(early), u.c.micro == replayed)
    rows = (sa.select(_SNAP_DAY, u.c.bill_id, u.c.account_no, u.c.period, u.c.unpaid_fen, u.c.micro,
                      sa.case((b.c.due_date > _SNAP_DAY, b.c.due_date), else_=_SNAP_DAY), u.c.fee_paid,
                      sa.case((replay_ok, sa.true()), else_=sa.false()))
            .select_from(u.join(b, b.c.bill_id == u.c.bill_id).join(c, c.c.account_no == u.c.account_no))
            .where(u.c.bill_id <= _b("bills_upto", type_=sa.BigInteger)))
    target = T_SNAP_BILL if into is None else sa.table(into, *(sa.column(c) for c in _SNAP_COLUMNS))
    return target.insert().from_select(_SNAP_COLUMNS, rows)


_COUNT_ROWS = sa.select(sa.func.count()).select_from(T_SNAP_BILL).where(T_SNAP_BILL.c.as_of == _DAY)


@dataclasses.dataclass(frozen=True)
class Retention:
    """What prune keeps (module docstring): the newest `keep_days` snapshots and the snapshots of the newest
    `month_ends` month ends (settings arrears_snapshots_keep_days, arrears_snapshot_month_ends_keep)."""
    keep_days: int = ARREARS_SNAPSHOTS_KEEP_DAYS
    month_ends: int = ARREARS_SNAPSHOT_MONTH_ENDS_KEEP

    def __post_init__(self) -> None:
        if self.keep_days < 1:
            raise InvalidField("arrears_snapshots_keep_days", "must be at least 1 (the newest snapshot)")
        if self.month_ends < 0:
            raise InvalidField("arrears_snapshot_month_ends_keep", "must not be negative")


@dataclasses.dataclass(frozen=True)
class Built:
    day: dt.date
    outcome: str  # BUILT, EXISTS (a valid snapshot of the day is there), BUSY (another job builds it)
    bills: int = 0
    seconds: float = 0.0


def _stamp(engine: Engine, t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(tzinfo=None) if engine.dialect.name == "sqlite" else t.astimezone(dt.UTC)


def _valid(conn: Connection, header: Any, rates: LateFeeRates) -> bool:
    """A snapshot reports read (reports._SNAPSHOT_OF): complete, of this format and these rates, and no
    reconciliation of a day on or before its day since it was taken."""
    return header.state == READY and int(header.format) == SNAPSHOT_FORMAT and header.rates == rates_key(rates) \
        and int(header.reconciled_count) == int(conn.execute(_RECONCILED_UPTO, {"day": header.as_of}).scalar_one())


def build(engine: Engine, clock: Clock, day: dt.date, retention: Retention | None = None,
          stop: threading.Event | None = None, rates: LateFeeRates | None = None) -> Built:
    """Takes the snapshot of `day` (see the module's docstring) with the late-fee `rates` (default: the
    default rates), then prunes by `retention` (default: the module's constants). Refuses a day that has not
    ended ARREARS_SNAPSHOT_MARGIN_S ago. stop: set, the wait for open transactions ends at once
    (TimeoutError; nothing is left behind)."""
    rates = rates or LateFeeRates()
    now = clock.now()
    if now < end_of_day_utc(day, clock.tz) + dt.timedelta(seconds=ARREARS_SNAPSHOT_MARGIN_S):
        raise InvalidField("day", f"{day} has not been over for {ARREARS_SNAPSHOT_MARGIN_S} s")
    t0 = time.monotonic()
    with engine.begin() as conn:
        header = conn.execute(_HEADER, {"day": day}).first()
        if header is not None:
            if _valid(conn, header, rates):
                return Built(day, "EXISTS")
            if header.state == BUILDING and not _stale(engine, header, now):
                return Built(day, "BUSY")
    if header is not None:
        _drop(engine, day)
    try:
        with engine.begin() as conn:
            max_bill = int(conn.execute(_MAX_BILL).scalar_one())
            reconciled = int(conn.execute(_RECONCILED_UPTO, {"day": day}).scalar_one())
            conn.execute(T_SNAP.insert().values(as_of=day, state=BUILDING, bills_upto=max_bill,
                                                reconciled_count=reconciled, bills=0,
                                                started_at=_stamp(engine, now), format=SNAPSHOT_FORMAT,
                                                rates=rates_key(rates)))
    except IntegrityError:
        return Built(day, "BUSY")
    try:
        _settle(engine, stop)
        if engine.dialect.name == "sqlite":
            n, bills_upto = _build_sqlite(engine, clock, day, max_bill, rates)
        else:
            n, bills_upto = _build_in_one(engine, clock, day, max_bill, rates)
    except BaseException:
        _drop(engine, day)
        raise
    return _built(engine, clock, day, n, bills_upto, t0, retention, rates)


def _build_in_one(engine: Engine, clock: Clock, day: dt.date, max_bill: int, rates: LateFeeRates) -> tuple[int, int]:
    """PostgreSQL and MariaDB: the rows computed and written by one statement in one transaction (writers of
    other rows are not held up: row locks). Returns (rows, bills_upto)."""
    options = {"isolation_level": "READ COMMITTED"} if engine.dialect.name == "mysql" else {}
    with engine.connect().execution_options(**options) as conn, conn.begin():
        issued_before = _stamp(engine, end_of_day_utc(day, clock.tz))
        # bills_upto: no bill at or below it was issued after the day (ids grow with each insert, and
        # every bill up to max_bill is committed or gone: _settle), so each one in arrears at the day's
        # end is in the snapshot; every bill above it the report reads from bills
        first_after = conn.execute(_FIRST_ISSUED_AFTER, {"issued_before": issued_before,
                                                         "max_bill": max_bill}).scalar()
        bills_upto = max_bill if first_after is None else int(first_after) - 1
        params = {"snap_day": day, "as_of": day, "bills_upto": bills_upto, "issued_before": issued_before}
        with _materialised(conn, params, rates):
            _no_jit(conn)
            conn.execute(_insert_rows(rates, engine.dialect.name), params)
        n = int(conn.execute(_COUNT_ROWS, {"day": day}).scalar_one())
        conn.execute(T_SNAP.update().where(T_SNAP.c.as_of == day, T_SNAP.c.state == BUILDING)
                     .values(state=READY, bills=n, bills_upto=bills_upto))
    return n, bills_upto


def _built(engine: Engine, clock: Clock, day: dt.date, n: int, bills_upto: int, t0: float,
           retention: Retention | None, rates: LateFeeRates) -> Built:
    _analyze(engine)
    built = Built(day, "BUILT", n, time.monotonic() - t0)
    log.info("event=arrears_snapshot day=%s bills=%d bills_upto=%d seconds=%.2f", day, n, bills_upto, built.seconds)
    prune(engine, clock, retention, rates)
    return built


_SQLITE_ROWS = "yd_arrears_snapshot_rows"
_COLS = ", ".join(_SNAP_COLUMNS)


def _build_sqlite(engine: Engine, clock: Clock, day: dt.date, max_bill: int, rates: LateFeeRates) -> tuple[int, int]:
    """SQLite writes under one lock for the whole database (every writer's transaction is BEGIN IMMEDIATE),
    so the reconstruction, seconds at a million bills, must not run in a write transaction: pays would wait
    out their busy timeout behind it. The rows are computed in one read transaction (one consistent view)
    into a temporary table, which lives in the connection's own temporary database and takes no lock on
    the main one; they are then copied in ARREARS_SNAPSHOT_COPY_ROWS per write transaction, so a pay waits
    at most one chunk's copy. The header stays BUILDING until the last chunk is in: no report reads a part.
    Returns (rows, bills_upto)."""
    with engine.connect() as conn:
        conn.execution_options(read_only=True)  # BEGIN, not BEGIN IMMEDIATE (yindian_common.db)
        try:
            with conn.begin():
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{_SQLITE_ROWS}")
                conn.exec_driver_sql(f"CREATE TEMP TABLE {_SQLITE_ROWS} AS SELECT {_COLS} "
                                     "FROM arrears_snapshot_bills WHERE 0")
                issued_before = _stamp(engine, end_of_day_utc(day, clock.tz))
                first_after = conn.execute(_FIRST_ISSUED_AFTER, {"issued_before": issued_before,
                                                                 "max_bill": max_bill}).scalar()
                bills_upto = max_bill if first_after is None else int(first_after) - 1
                conn.execute(_insert_rows(rates, "sqlite", _SQLITE_ROWS),
                             {"snap_day": day, "as_of": day, "bills_upto": bills_upto,
                              "issued_before": issued_before})
                last = int(conn.exec_driver_sql(f"SELECT coalesce(max(rowid), 0) FROM temp.{_SQLITE_ROWS}")
                           .scalar_one())
            conn.execution_options(read_only=False)
            for lo in range(0, last, ARREARS_SNAPSHOT_COPY_ROWS):
                with conn.begin():
                    conn.exec_driver_sql(f"INSERT INTO arrears_snapshot_bills ({_COLS}) SELECT {_COLS} "
                                         f"FROM temp.{_SQLITE_ROWS} WHERE rowid > ? AND rowid <= ?",
                                         (lo, lo + ARREARS_SNAPSHOT_COPY_ROWS))
            with conn.begin():
                n = int(conn.execute(_COUNT_ROWS, {"day": day}).scalar_one())
                conn.execute(T_SNAP.update().where(T_SNAP.c.as_of == day, T_SNAP.c.state == BUILDING)
                             .values(state=READY, bills=n, bills_upto=bills_upto))
        finally:
            conn.execution_options(read_only=True)
            with conn.begin():
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{_SQLITE_ROWS}")
    return n, bills_upto


def _analyze(engine: Engine) -> None:
    """Fresh planner statistics of the snapshot's bills (a new snapshot is most of the table; without them
    PostgreSQL estimated its 200k rows at 741 and planned the report's joins for that)."""
    statement = {"postgresql": "ANALYZE arrears_snapshot_bills", "mysql": "ANALYZE TABLE arrears_snapshot_bills",
                 "sqlite": "ANALYZE arrears_snapshot_bills"}.get(engine.dialect.name)
    if statement:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(statement).close()


def _stale(engine: Engine, header: Any, now: dt.datetime) -> bool:
    started = header.started_at if header.started_at.tzinfo else header.started_at.replace(tzinfo=dt.UTC)
    return now - started > dt.timedelta(seconds=ARREARS_SNAPSHOT_BUILD_STALE_S)


def _open_transactions(conn: Connection) -> set[tuple[Any, ...]]:
    """The other sessions' open transactions, each as a key that a later transaction of the same session
    does not share. SQLite: none matter (one writer at a time, and a bill's id is above every committed one)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        rows = conn.exec_driver_sql(
            "SELECT pid, xact_start FROM pg_stat_activity WHERE xact_start IS NOT NULL "
            "AND pid <> pg_backend_pid() AND datname = current_database()").all()
    elif dialect == "mysql":
        rows = conn.exec_driver_sql(
            "SELECT trx_id, trx_mysql_thread_id FROM information_schema.innodb_trx "
            "WHERE trx_mysql_thread_id <> CONNECTION_ID() AND trx_mysql_thread_id IN "
            "(SELECT id FROM information_schema.processlist WHERE db = DATABASE())").all()
    else:
        return set()
    return {tuple(r) for r in rows}


def _settle(engine: Engine, stop: threading.Event | None = None) -> None:
    """Waits until every transaction open now has ended (bounded by ARREARS_SNAPSHOT_SETTLE_WAIT_S, and by
    `stop` when given)."""
    stop = stop or threading.Event()
    with engine.connect() as conn:
        pending = _open_transactions(conn)
        conn.rollback()
        deadline = time.monotonic() + ARREARS_SNAPSHOT_SETTLE_WAIT_S
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"arrears snapshot: {len(pending)} transactions still open after "
                                   f"{ARREARS_SNAPSHOT_SETTLE_WAIT_S} s")
            if stop.wait(ARREARS_SNAPSHOT_POLL_S):
                raise TimeoutError("arrears snapshot: stopped while waiting for open transactions")
            pending &= _open_transactions(conn)
            conn.rollback()


def _drop(engine: Engine, day: dt.date) -> None:
    """Drops the snapshot of `day`: DROPPING (no report chooses it), its bills a bounded range at a time,
    then the header."""
    with engine.begin() as conn:
        conn.execute(T_SNAP.update().where(T_SNAP.c.as_of == day).values(state=DROPPING))
        low, high = conn.execute(sa.select(sa.func.min(T_SNAP_BILL.c.bill_id), sa.func.max(T_SNAP_BILL.c.bill_id))
                                 .where(T_SNAP_BILL.c.as_of == day)).one()
    if low is not None:
        for start in range(int(low), int(high) + 1, ARREARS_SNAPSHOT_DELETE_ROWS):
            with engine.begin() as conn:
                conn.execute(T_SNAP_BILL.delete().where(
                    T_SNAP_BILL.c.as_of == day, T_SNAP_BILL.c.bill_id >= start,
                    T_SNAP_BILL.c.bill_id < start + ARREARS_SNAPSHOT_DELETE_ROWS))
    with engine.begin() as conn:
        conn.execute(T_SNAP.delete().where(T_SNAP.c.as_of == day, T_SNAP.c.state == DROPPING))


def kept(days: Sequence[dt.date], retention: Retention | None = None) -> set[dt.date]:
    """The snapshot days the retention rule keeps of `days` (each a valid snapshot's day)."""
    retention = retention or Retention()
    newest = sorted(days, reverse=True)
    month_ends = [d for d in newest if (d + dt.timedelta(days=1)).month != d.month]
    return set(newest[:retention.keep_days]) | set(month_ends[:retention.month_ends])


def prune(engine: Engine, clock: Clock, retention: Retention | None = None,
          rates: LateFeeRates | None = None) -> list[dt.date]:
    """Drops what the retention rule does not keep (module docstring), and every snapshot reports with
    `rates` would not read; returns the days dropped."""
    now = clock.now()
    with engine.begin() as conn:
        headers = conn.execute(_HEADERS).all()
        valid = [h.as_of for h in headers if _valid(conn, h, rates or LateFeeRates())]
    keep = kept(valid, retention)
    gone = [h.as_of for h in headers
            if (h.state == READY and h.as_of not in keep) or h.state == DROPPING
            or (h.state == READY and h.as_of not in valid) or (h.state == BUILDING and _stale(engine, h, now))]
    for day in gone:
        _drop(engine, day)
    return gone


def newest_closed_day(engine: Engine, clock: Clock) -> dt.date | None:
    """The newest day every bank that has reconciled a day has reconciled, before today and over for
    ARREARS_SNAPSHOT_MARGIN_S; None when no bank has reconciled a day."""
    with engine.connect() as conn:
        day = conn.execute(_NEWEST_CLOSED).scalar()
    if day is None:
        return None
    if isinstance(day, str):  # SQLite returns an aggregate of dates as text
        day = dt.date.fromisoformat(day)
    latest = business_date(clock) - dt.timedelta(days=1)
    while end_of_day_utc(latest, clock.tz) + dt.timedelta(seconds=ARREARS_SNAPSHOT_MARGIN_S) > clock.now():
        latest -= dt.timedelta(days=1)
    return min(day, latest)


class SnapshotJob:
    """`serve`'s arrears snapshot job (setting arrears_snapshot_interval_s; 0: off): every interval, in every
    branch database, the snapshot of the newest day every bank has closed (newest_closed_day) unless a valid
    one is there, then prune by `retention`. A day's close is its last bank's reconciliation, so the
    snapshot follows it within one interval; a reconciliation of an older day afterwards (which makes reports
    ignore the snapshots it predates) is followed by a new snapshot of the newest day at the next pass. Each
    pass is two small queries when there is nothing to take; several processes may run the job (a second
    one finds the day BUSY or EXISTS). A database error or a build that times out is logged and tried again
    at the next pass."""

    def __init__(self, engines: Sequence[Engine], clock: Clock, interval_s: float,
                 retention: Retention | None = None, rates: LateFeeRates | None = None) -> None:
        if interval_s <= 0:
            raise InvalidField("arrears_snapshot_interval_s", "must be positive for the job to run")
        self._engines, self._clock, self._interval_s = list(engines), clock, interval_s
        self._retention, self._rates = retention or Retention(), rates or LateFeeRates()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="arrears-snapshot", daemon=True)

    def run_once(self) -> list[Built]:
        """One pass over every database: what was built (or found) for each, in order."""
        out = []
        for engine in self._engines:
            day = newest_closed_day(engine, self._clock)
            if day is not None and not self._stop.is_set():
                out.append(build(engine, self._clock, day, self._retention, self._stop, self._rates))
        return out

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the job within ARREARS_SNAPSHOT_STOP_S (a build in its INSERT ... SELECT is left to the
        database: the process is ending, and a BUILDING header is dropped by a later pass once stale)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(ARREARS_SNAPSHOT_STOP_S)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                for built in self.run_once():
                    if built.outcome != "EXISTS":
                        log.info("event=arrears_snapshot_job day=%s outcome=%s bills=%d", built.day,
                                 built.outcome, built.bills)
            except (sa.exc.SQLAlchemyError, TimeoutError, InvalidField) as exc:
                log.warning("event=arrears_snapshot_job_failed error=%s %s", type(exc).__name__, exc)


def main(argv: list[str]) -> int:
    """`python -m mis_adapter arrears-snapshot --db URL [--branch-db CODE=URL ...] [--day D]`: takes the
    snapshot in every branch database, then prunes. Exit 1 when another job was taking one (BUSY)."""
    from mis_adapter.routing import BranchRouter
    from mis_adapter.settings import AdapterSettings
    from yindian_common.clock import DEFAULT_TZ, make_clock
    from yindian_common.fields import iso_date
    from yindian_common.settings import load_settings

    p = argparse.ArgumentParser(prog="python -m mis_adapter arrears-snapshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="SQLAlchemy URL of the MIS database")
    p.add_argument("--branch-db", action="append", default=[], help="CODE=URL (repeatable)")
    p.add_argument("--day", default="", help="the day (YYYY-MM-DD); default: the newest day every bank has closed")
    p.add_argument("--clock-start", default="", help="run the clock from this ISO instant (tests, demos)")
    p.add_argument("--timezone", default=DEFAULT_TZ, help="the utility's time zone: business dates")
    p.add_argument("--keep-days", type=int, default=ARREARS_SNAPSHOTS_KEEP_DAYS,
                   help="newest snapshots kept (serve: arrears_snapshots_keep_days)")
    p.add_argument("--keep-month-ends", type=int, default=ARREARS_SNAPSHOT_MONTH_ENDS_KEEP,
                   help="month-end snapshots kept (serve: arrears_snapshot_month_ends_keep)")
    args = p.parse_args(argv)
    settings = load_settings(AdapterSettings, {"db": args.db, "timezone": args.timezone})
    clock = make_clock(args.clock_start or None, args.timezone)
    try:
        retention = Retention(args.keep_days, args.keep_month_ends)
    except InvalidField as err:
        print(f"arrears snapshot refused: {err.message}", file=sys.stderr)
        return 2
    router = BranchRouter.from_specs(args.db, args.branch_db)
    status = 0
    try:
        for engine in router.engines():
            day = iso_date(args.day, "--day") if args.day else newest_closed_day(engine, clock)
            if day is None:
                print("arrears snapshot: no bank has reconciled a day yet, none taken")
                continue
            built = build(engine, clock, day, retention, rates=settings.late_fee_rates())
            print(f"arrears snapshot {built.day}: {built.outcome} bills={built.bills} seconds={built.seconds:.2f}")
            status = status or (1 if built.outcome == "BUSY" else 0)
    except InvalidField as err:
        print(f"arrears snapshot refused: {err.message}", file=sys.stderr)
        return 2
    finally:
        router.dispose()
    return status
