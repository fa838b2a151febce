"""Arrears snapshots: the bills in arrears at the end of a closed day S, taken once by a job, so
that an arrears report for S or any later date reads them (O(bills in arrears at S) narrow rows)
instead of every bill (reports._arrears_bills with snap). A report for a date before the oldest
snapshot reconstructs from every bill, as before.

What a snapshot holds (db/arrears.py): the bills in arrears at the end of S that no payment
settled or reversed after S had touched, each with the columns the late-fee rule reads as its row
held them, and `bills_upto`, the largest bill id when it was taken. A report for D >= S adds the
bills issued since (id above bills_upto) and the bills touched after S (found from the payments
by their indexes, the existing history code), so it is exact for every D >= S as long as nothing
dated on or before S is written after the snapshot.

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
  job read bills_upto has larger bill ids (ids grow with each insert), and the report reads every
  bill above bills_upto whatever its issue time.
- A reconciliation of a day on or before S (BANK_ONLY posts, UTILITY_ONLY reversals, dated that
  day) can come at any time. It inserts that day's reconciled_days row in the same transaction;
  the snapshot keeps the count of those rows dated on or before S from when it was taken, and a
  report whose own count differs ignores the snapshot (reports._snapshot_of), as does the job,
  which drops it (prune).

When: `python -m mis_adapter arrears-snapshot` (an operator or the scheduler after the day's
reconciliations; --day for a given day). Without --day the day is the newest day every bank that
has ever reconciled has reconciled (so that no reconciliation of it is still to come), and not
today. The reports never write: a missing snapshot only makes a report slower, never different.

Concurrency: the header row (state BUILDING) is inserted and committed first (its key is the day:
a second job for the day stops), the bills are one INSERT ... SELECT (no rows through Python;
MariaDB reads them as a consistent read, READ COMMITTED, so no row a Pay writes is locked), then
the header becomes READY in the same transaction. Reports read in one snapshot of the database
(reports._report_connection), so a snapshot dropped while a report reads it is still whole for
that report.

Retention (prune, after every build): the newest ARREARS_SNAPSHOTS_KEEP_DAYS snapshots, and the
snapshots of month ends among the newest ARREARS_SNAPSHOT_MONTH_ENDS_KEEP month ends (past-date
reports read the newest snapshot on or before their date); every other snapshot, every one no
longer exact, and every BUILDING header older than ARREARS_SNAPSHOT_BUILD_STALE_S are dropped:
first marked DROPPING (no report chooses it), then its bills deleted ARREARS_SNAPSHOT_DELETE_ROWS
bill ids at a time, then the header."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from mis_adapter.db.arrears import BUILDING, READY
from mis_adapter.reports import (
    _SNAP_DAY,
    T_BILL,
    T_RECON,
    T_SNAP,
    T_SNAP_BILL,
    _touched_select,
    end_of_day_utc,
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


def _unpaid(b: Any) -> Any:
    return b.c.amount_fen - b.c.prepaid_applied_fen - b.c.principal_paid_fen


def _rows_select() -> sa.Select[Any]:
    """The snapshot's bills of day :snap_day: issued by its end (:issued_before), not paid by then
    (paid_on is set exactly when a bill is PAID), principal unpaid now, at or below :bills_upto, and not
    touched by a payment settled or reversed after the day (reports._touched_select): their row now is
    their row at the end of the day."""
    b = T_BILL
    return (sa.select(_SNAP_DAY, b.c.bill_id, b.c.account_no, b.c.period, _unpaid(b), b.c.accrual_micro,
                      b.c.accrual_date, b.c.late_fee_paid_fen)
            .where(b.c.account_no.is_not(None), sa.or_(b.c.paid_on.is_(None), b.c.paid_on > _SNAP_DAY),
                   b.c.issued_at < _b("issued_before"), _unpaid(b) > 0,
                   b.c.bill_id <= _b("bills_upto", type_=sa.BigInteger),
                   b.c.bill_id.not_in(_touched_select(day=_SNAP_DAY))))


_COUNT_ROWS = sa.select(sa.func.count()).select_from(T_SNAP_BILL).where(T_SNAP_BILL.c.as_of == _DAY)
_INSERT_ROWS = T_SNAP_BILL.insert().from_select(
    ["as_of", "bill_id", "account_no", "period", "unpaid_fen", "accrual_micro", "accrual_date", "late_fee_paid_fen"],
    _rows_select())


@dataclasses.dataclass(frozen=True)
class Built:
    day: dt.date
    outcome: str  # BUILT, EXISTS (a valid snapshot of the day is there), BUSY (another job builds it)
    bills: int = 0
    seconds: float = 0.0


def _stamp(engine: Engine, t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(tzinfo=None) if engine.dialect.name == "sqlite" else t.astimezone(dt.UTC)


def _valid(conn: Connection, header: Any) -> bool:
    return header.state == READY and int(header.reconciled_count) == int(
        conn.execute(_RECONCILED_UPTO, {"day": header.as_of}).scalar_one())


def build(engine: Engine, clock: Clock, day: dt.date) -> Built:
    """Takes the snapshot of `day` (see the module's docstring), then prunes. Refuses a day that has not
    ended ARREARS_SNAPSHOT_MARGIN_S ago."""
    now = clock.now()
    if now < end_of_day_utc(day, clock.tz) + dt.timedelta(seconds=ARREARS_SNAPSHOT_MARGIN_S):
        raise InvalidField("day", f"{day} has not been over for {ARREARS_SNAPSHOT_MARGIN_S} s")
    t0 = time.monotonic()
    with engine.begin() as conn:
        header = conn.execute(_HEADER, {"day": day}).first()
        if header is not None:
            if _valid(conn, header):
                return Built(day, "EXISTS")
            if header.state == BUILDING and not _stale(engine, header, now):
                return Built(day, "BUSY")
    if header is not None:
        _drop(engine, day)
    try:
        with engine.begin() as conn:
            bills_upto = int(conn.execute(_MAX_BILL).scalar_one())
            reconciled = int(conn.execute(_RECONCILED_UPTO, {"day": day}).scalar_one())
            conn.execute(T_SNAP.insert().values(as_of=day, state=BUILDING, bills_upto=bills_upto,
                                                reconciled_count=reconciled, bills=0,
                                                started_at=_stamp(engine, now)))
    except IntegrityError:
        return Built(day, "BUSY")
    try:
        _settle(engine)
        options = {"isolation_level": "READ COMMITTED"} if engine.dialect.name == "mysql" else {}
        with engine.connect().execution_options(**options) as conn, conn.begin():
            cutoff = end_of_day_utc(day, clock.tz)
            conn.execute(_INSERT_ROWS, {"snap_day": day, "bills_upto": bills_upto,
                                        "issued_before": _stamp(engine, cutoff)})
            n = int(conn.execute(_COUNT_ROWS, {"day": day}).scalar_one())
            conn.execute(T_SNAP.update().where(T_SNAP.c.as_of == day, T_SNAP.c.state == BUILDING)
                         .values(state=READY, bills=n))
    except BaseException:
        _drop(engine, day)
        raise
    _analyze(engine)
    built = Built(day, "BUILT", n, time.monotonic() - t0)
    log.info("event=arrears_snapshot day=%s bills=%d bills_upto=%d seconds=%.2f", day, n, bills_upto, built.seconds)
    prune(engine, clock)
    return built


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


def _settle(engine: Engine) -> None:
    """Waits until every transaction open now has ended (bounded by ARREARS_SNAPSHOT_SETTLE_WAIT_S)."""
    with engine.connect() as conn:
        pending = _open_transactions(conn)
        conn.rollback()
        deadline = time.monotonic() + ARREARS_SNAPSHOT_SETTLE_WAIT_S
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"arrears snapshot: {len(pending)} transactions still open after "
                                   f"{ARREARS_SNAPSHOT_SETTLE_WAIT_S} s")
            time.sleep(ARREARS_SNAPSHOT_POLL_S)
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


def kept(days: Sequence[dt.date]) -> set[dt.date]:
    """The snapshot days the retention rule keeps of `days` (each a valid snapshot's day)."""
    newest = sorted(days, reverse=True)
    month_ends = [d for d in newest if (d + dt.timedelta(days=1)).month != d.month]
    return set(newest[:ARREARS_SNAPSHOTS_KEEP_DAYS]) | set(month_ends[:ARREARS_SNAPSHOT_MONTH_ENDS_KEEP])


def prune(engine: Engine, clock: Clock) -> list[dt.date]:
    """Drops what the retention rule does not keep (module docstring); returns the days dropped."""
    now = clock.now()
    with engine.begin() as conn:
        headers = conn.execute(_HEADERS).all()
        valid = [h.as_of for h in headers if _valid(conn, h)]
    keep = kept(valid)
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
    args = p.parse_args(argv)
    load_settings(AdapterSettings, {"db": args.db, "timezone": args.timezone})
    clock = make_clock(args.clock_start or None, args.timezone)
    router = BranchRouter.from_specs(args.db, args.branch_db)
    status = 0
    try:
        for engine in router.engines():
            day = iso_date(args.day, "--day") if args.day else newest_closed_day(engine, clock)
            if day is None:
                print("arrears snapshot: no bank has reconciled a day yet, none taken")
                continue
            built = build(engine, clock, day)
            print(f"arrears snapshot {built.day}: {built.outcome} bills={built.bills} seconds={built.seconds:.2f}")
            status = status or (1 if built.outcome == "BUSY" else 0)
    except InvalidField as err:
        print(f"arrears snapshot refused: {err.message}", file=sys.stderr)
        return 2
    finally:
        router.dispose()
    return status
