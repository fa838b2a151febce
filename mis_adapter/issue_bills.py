"""Issuing a period's bills (出账): prices the unbilled meter readings of a
period at tariff (mis_adapter.tariff), applies each account's prepaid credit first, and writes
every bill of an account with an active auto-debit agreement at bank B (started
on or before today, the bill not above its per-debit limit) into
B's feed outbox in the same transaction, with the next gapless per-bank seq.

Accounts are issued in batches (`batch_accounts`), each one transaction
that locks its customers rows (the lock payments take) in account order and
takes the banks' counter rows last, so issuers and payers never deadlock and
the counter rows are held only briefly. A bill fully covered by prepaid
credit is issued PAID and not fed (there is nothing to debit).

`python -m mis_adapter issue-bills --db URL --period YYYYMM`; the seed and
tests call `issue_bills(engine, clock, period)`."""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import NamedTuple

import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.engine import Connection, Engine

from mis_adapter import feed
from mis_adapter.db.base import table_of
from mis_adapter.db.core import Agreement, BillRow, Customer, PrepaidEntry, Reading
from mis_adapter.migrate import upgrade
from mis_adapter.tariff import Tariff, price_fen
from yindian_common.bulk_sql import InList
from yindian_common.clock import DEFAULT_TZ, Clock, business_date, make_clock
from yindian_common.db import make_engine
from yindian_common.errors import InvalidField
from yindian_common.logs import setup_logging
from yindian_common.settings import YinDianSettings, add_settings_flags, load_settings

log = logging.getLogger("mis_adapter.issue_bills")

T_READ = table_of(Reading)
T_CUST = table_of(Customer)
T_AGR = table_of(Agreement)
T_BILLS = table_of(BillRow)
T_PREPAID = table_of(PrepaidEntry)
_b = sa.bindparam
_PERIOD_RE = re.compile(r"[0-9]{4}(0[1-9]|1[0-2])")
ISSUE_WORKERS_MAX = 16   # batches issued at once (connections)
# PostgreSQL: the tables issuance reads by account are analyzed first when this share of their rows changed
# since their last ANALYZE (or they never had one); ANALYZE waits at most STATS_LOCK_WAIT_MS for its lock.
STATS_STALE_SHARE = 0.1
STATS_LOCK_WAIT_MS = 2_000
_STATS_TABLES = ("readings", "customers", "agreements")
# ... and those it writes and the feed then reads by bill, account and seq, after the first batch has committed
_WRITTEN_STATS_TABLES = ("bills", "feed_outbox")


@dataclass
class IssueSummary:
    period: str
    bills: int = 0
    amount_fen: int = 0
    prepaid_applied_fen: int = 0
    fed: dict[str, int] = field(default_factory=dict)   # bank -> notices written
    fed_fen: dict[str, int] = field(default_factory=dict)
    skipped_existing: int = 0


def check_period(period: str) -> str:
    if not _PERIOD_RE.fullmatch(period):
        raise InvalidField("period", "must be YYYYMM")
    return period


_NEXT_ACCOUNTS = (sa.select(T_READ.c.account_no).distinct()
                  .where(T_READ.c.period == _b("period"), T_READ.c.billed == sa.false(),
                         T_READ.c.account_no > _b("after"))
                  .order_by(T_READ.c.account_no).limit(_b("limit")))
_LOCK_CUSTOMERS = (sa.select(T_CUST.c.account_no, T_CUST.c.tariff_class, T_CUST.c.prepaid_fen)
                   .where(InList(T_CUST.c.account_no, "accts"))
                   .order_by(T_CUST.c.account_no).with_for_update())
_KWH = (sa.select(T_READ.c.account_no, sa.func.sum(T_READ.c.kwh).label("kwh"))
        .where(T_READ.c.period == _b("period"), T_READ.c.billed == sa.false(),
               InList(T_READ.c.account_no, "accts"))
        .group_by(T_READ.c.account_no))
# MariaDB (no UPDATE ... RETURNING): the readings priced, by id, so that exactly they are marked billed; a
# reading committed after this read is left unbilled (and counted as skipped by the next run), never marked
# billed without being priced.
_READINGS = (sa.select(T_READ.c.reading_id, T_READ.c.account_no, T_READ.c.kwh)
             .where(T_READ.c.period == _b("period"), T_READ.c.billed == sa.false(),
                    InList(T_READ.c.account_no, "accts")))
_MARK_BILLED_IDS = T_READ.update().where(InList(T_READ.c.reading_id, "ids")).values(billed=True)
_EXISTING = sa.select(T_BILLS.c.account_no).where(T_BILLS.c.period == _b("period"),
                                                  InList(T_BILLS.c.account_no, "accts"))
_BILL_IDS = sa.select(T_BILLS.c.account_no, T_BILLS.c.bill_id).where(
    T_BILLS.c.period == _b("period"), InList(T_BILLS.c.account_no, "accts"))
_MARK_BILLED = T_READ.update().where(T_READ.c.period == _b("p_period"), T_READ.c.billed == sa.false(),
                                     InList(T_READ.c.account_no, "accts")).values(billed=True)
_MARK_BILLED_RETURNING = _MARK_BILLED.returning(T_READ.c.account_no, T_READ.c.kwh)


def _marks_returning(conn: Connection) -> bool:
    """Whether the readings are marked and read in one UPDATE ... RETURNING (PostgreSQL, SQLite)."""
    return bool(conn.dialect.update_returning)


# Active agreements that have started (signed_on is the start date), with their per-debit limit.
_AGREEMENTS = sa.select(T_AGR.c.account_no, T_AGR.c.bank_id, T_AGR.c.debit_limit_fen).where(
    InList(T_AGR.c.account_no, "accts"), T_AGR.c.active == sa.true(), T_AGR.c.signed_on <= _b("today"))
# PostgreSQL: the batch's bills of the period and its agreements read by one index probe per account (a
# LATERAL subquery that OFFSET 0 keeps from being flattened into a join). Given 5,000 accounts as `= ANY`,
# PostgreSQL read the whole table for each batch: every agreement, and every bill once the period's first
# batch made the period most of the bills (statistics taken after it: refresh_statistics).
_PG_EXISTING = (
    "SELECT b.account_no FROM unnest(%(accts)s::text[]) AS a(acct) CROSS JOIN LATERAL ("
    "SELECT account_no FROM bills WHERE account_no = a.acct AND period = %(period)s OFFSET 0) AS b")
_PG_AGREEMENTS = (
    "SELECT g.account_no, g.bank_id, g.debit_limit_fen FROM unnest(%(accts)s::text[]) AS a(acct) CROSS JOIN LATERAL ("
    "SELECT account_no, bank_id, debit_limit_fen FROM agreements "
    "WHERE account_no = a.acct AND active AND signed_on <= %(today)s OFFSET 0) AS g")


def _read(conn: Connection, statement: sa.Select, pg_sql: str, params: dict[str, object]) -> list[sa.Row]:  # type: ignore[type-arg]
    """`statement`, or on PostgreSQL its probing form `pg_sql` (same columns, same rows)."""
    if conn.dialect.name == "postgresql":
        return list(conn.exec_driver_sql(pg_sql, params).all())
    return list(conn.execute(statement, params).all())


_TAKE_PREPAID = T_CUST.update().where(T_CUST.c.account_no == _b("acct")).values(
    prepaid_fen=T_CUST.c.prepaid_fen - _b("applied"))


class _NewBill(NamedTuple):
    """A bill about to be written (a named tuple: one is built per bill, and a frozen dataclass's
    field-by-field __init__ cost 1.3 against 0.35 µs)."""
    account_no: str
    kwh: int
    amount_fen: int
    prepaid_applied_fen: int
    prepaid_after_fen: int


def _issue_batch(conn: Connection, accts: Sequence[str], period: str, tariff: Tariff, issued_at: dt.datetime,
                 today: dt.date, due_date: dt.date, summary: IssueSummary) -> set[str]:
    """One transaction's work; returns the banks whose outbox grew."""
    batch = feed.list_of(conn, accts)
    customers = {r.account_no: r for r in conn.execute(_LOCK_CUSTOMERS, {"accts": batch}).all()}
    existing = {r.account_no for r in _read(conn, _EXISTING, _PG_EXISTING, {"period": period, "accts": batch})}
    if _marks_returning(conn):
        # One statement marks the readings billed and answers their kWh: of the accounts that get a bill
        # (a customer, no bill of the period yet), exactly the readings summed are the readings marked.
        billable = [a for a in sorted(accts) if a in customers and a not in existing]
        kwh: dict[str, int] = {}
        marked = conn.execute(_MARK_BILLED_RETURNING, {"p_period": period, "accts": feed.list_of(conn, billable)}).all() \
            if billable else []
        for acct, n in marked:
            kwh[acct] = kwh.get(acct, 0) + int(n)
        if existing:
            skipped = feed.list_of(conn, sorted(existing))
            summary.skipped_existing += len(conn.execute(_KWH, {"period": period, "accts": skipped}).all())
    else:  # MariaDB: no UPDATE ... RETURNING; the readings read, then the same readings (by id) marked below
        kwh = {}
        reading_ids: dict[str, list[int]] = {}
        for reading_id, acct, n in conn.execute(_READINGS, {"period": period, "accts": batch}).all():
            kwh[acct] = kwh.get(acct, 0) + int(n)
            reading_ids.setdefault(acct, []).append(int(reading_id))
        summary.skipped_existing += len(existing & set(kwh))
    new: list[_NewBill] = []
    for acct in sorted(kwh):
        c = customers.get(acct)
        if c is None or acct in existing:
            continue
        amount = price_fen(kwh[acct], c.tariff_class, tariff)
        applied = min(int(c.prepaid_fen), amount)
        new.append(_NewBill(acct, kwh[acct], amount, applied, int(c.prepaid_fen) - applied))
    if not new:
        return set()
    # The new bills' ids come back from the INSERT on PostgreSQL (RETURNING); elsewhere they are read back.
    paid = [b.prepaid_applied_fen == b.amount_fen for b in new]
    returned = feed.insert_columns(conn, T_BILLS, {
        "period": period, "principal_paid_fen": 0, "late_fee_paid_fen": 0, "accrual_micro": 0,
        "accrual_date": due_date, "due_date": due_date, "issued_at": issued_at, "dunning": False,
    }, {"account_no": [b.account_no for b in new], "kwh": [b.kwh for b in new],
        "amount_fen": [b.amount_fen for b in new], "prepaid_applied_fen": [b.prepaid_applied_fen for b in new],
        "status": ["PAID" if p else "UNPAID" for p in paid], "paid_on": [today if p else None for p in paid]},
        returning=("account_no", "bill_id"))
    new_accts = feed.list_of(conn, [b.account_no for b in new])
    if not _marks_returning(conn):
        conn.execute(_MARK_BILLED_IDS, {"ids": feed.list_of(conn, [i for b in new for i in reading_ids[b.account_no]])})
    if returned is not None:
        ids = {acct: int(bill_id) for acct, bill_id in returned}
    else:
        ids = {r.account_no: r.bill_id for r in conn.execute(_BILL_IDS, {"period": period, "accts": new_accts}).all()}
    with_prepaid = [b for b in new if b.prepaid_applied_fen > 0]
    if with_prepaid:
        conn.execute(_TAKE_PREPAID, [{"acct": b.account_no, "applied": b.prepaid_applied_fen} for b in with_prepaid])
        conn.execute(T_PREPAID.insert(), [
            {"account_no": b.account_no, "reason": "BILL_APPLIED", "delta_fen": -b.prepaid_applied_fen,
             "balance_after_fen": b.prepaid_after_fen, "payment_id": None, "bill_id": ids[b.account_no],
             "at": issued_at} for b in with_prepaid])
    agreed = {r.account_no: r for r in _read(conn, _AGREEMENTS, _PG_AGREEMENTS, {"accts": new_accts, "today": today})}
    by_bank: dict[str, list[tuple[_NewBill, int]]] = {}
    for b in new:
        due = b.amount_fen - b.prepaid_applied_fen
        agreement = agreed.get(b.account_no)
        if agreement is None or due <= 0:
            continue
        if agreement.debit_limit_fen is not None and due > agreement.debit_limit_fen:
            continue  # above the agreement's per-debit limit: paid at the counter, not fed
        by_bank.setdefault(agreement.bank_id, []).append((b, due))
    # Counter rows last and in bank order: held for the shortest time, never in opposite orders.
    for bank in sorted(by_bank):
        fed = by_bank[bank]
        first = feed.take_seqs(conn, bank, len(fed))
        feed.insert_outbox(conn, bank, first, {"period": period, "due_date": due_date, "issued_at": issued_at}, {
            "bill_id": [ids[b.account_no] for b, _due in fed], "account_no": [b.account_no for b, _due in fed],
            "kwh": [b.kwh for b, _due in fed], "amount_fen": [due for _b, due in fed]})
        summary.fed[bank] = summary.fed.get(bank, 0) + len(fed)
        summary.fed_fen[bank] = summary.fed_fen.get(bank, 0) + sum(due for _b, due in fed)
    feed.notify_banks(conn, by_bank)
    summary.bills += len(new)
    summary.amount_fen += sum(b.amount_fen for b in new)
    summary.prepaid_applied_fen += sum(b.prepaid_applied_fen for b in new)
    return set(by_bank)


_STATS_AGE = sa.text(
    "SELECT relname, n_live_tup, n_mod_since_analyze, coalesce(last_analyze, last_autoanalyze) IS NULL "
    "FROM pg_stat_user_tables WHERE schemaname = current_schema() AND relname = ANY(:names)")


def refresh_statistics(engine: Engine, tables: Sequence[str] = _STATS_TABLES) -> list[str]:
    """PostgreSQL: ANALYZEs those of `tables` whose planner statistics are stale; returns them. A period's
    readings are loaded in bulk just before it is issued (and the benchmark's households just before
    that), and autovacuum analyzes a table only within a minute or so: planned blind, every batch's
    look-ups by 5,000 accounts were whole-table scans (the next accounts: a bitmap scan and an on-disk
    sort of every unbilled reading, 48 ms per batch against 4 with statistics; the customers' lock 38
    against 12 ms; marking the readings 57 against 29), so issuing grew with the square of the period.
    The same for the bills and the outbox the run writes: in a benchmark's empty tables, every posting
    batch read the feed's bills by a scan of all of them (30 against 11 ms to settle 5,000) and every
    notice batch the outbox by a scan and a sort of all its rows after the cursor (32 against 0.7 ms
    for 2,500). ANALYZE reads a bounded sample (300 x default_statistics_target rows) whatever the
    table's size. A table whose ANALYZE cannot take its lock within STATS_LOCK_WAIT_MS (autovacuum is
    analyzing it) is left to it."""
    if engine.dialect.name != "postgresql":
        return []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        stale = sorted(name for name, live, changed, never in conn.execute(_STATS_AGE, {"names": list(tables)})
                       if never or changed > STATS_STALE_SHARE * max(live, 1))
        done = []
        for name in stale:
            conn.exec_driver_sql(f"SET lock_timeout = {STATS_LOCK_WAIT_MS}")
            try:
                conn.exec_driver_sql(f"ANALYZE {name}")
            except sa.exc.OperationalError:
                log.info("event=issue_statistics_skipped table=%s", name)
                continue
            finally:
                conn.exec_driver_sql("RESET lock_timeout")
            done.append(name)
    if done:
        log.info("event=issue_statistics_refreshed tables=%s", ",".join(done))
    return done


def issue_bills(engine: Engine, clock: Clock, period: str, *, tariff: Tariff | None = None, due_days: int = 20,
                batch_accounts: int = 2_000, accounts: Sequence[str] | None = None,
                before_commit: Callable[[Sequence[str]], None] | None = None, workers: int = 1) -> IssueSummary:
    """Issues the period's bills for every account with unbilled readings
    (or only `accounts`). Safe to run again: billed readings and existing
    bills are skipped. `before_commit` is called inside each batch's
    transaction just before it commits (tests hold a transaction open with it).
    With `workers` > 1 (not on SQLite: one writer at a time) that many
    batches are issued at once, each in its own transaction on its own
    connection: their accounts are disjoint and the counter rows are taken
    last, in bank order, so they never deadlock. Raises this process's garbage collection threshold
    (feed.raise_gc_threshold)."""
    check_period(period)
    feed.raise_gc_threshold(feed.FeedSettings.gc_gen0_threshold)
    if batch_accounts < 1 or due_days < 0:
        raise ValueError("batch_accounts must be positive and due_days not negative")
    if not 1 <= workers <= ISSUE_WORKERS_MAX:
        raise ValueError(f"workers must be between 1 and {ISSUE_WORKERS_MAX}")
    tariff = tariff or Tariff()
    summary = IssueSummary(period)
    issued_at = feed._utc(clock.now())
    today = business_date(clock)
    due_date = today + dt.timedelta(days=due_days)
    wanted = sorted(set(accounts)) if accounts is not None else None
    # A run of more than one batch first brings the statistics of the tables it reads up to date, then, once
    # its first batch has committed, those of the tables it writes (see refresh_statistics).
    bulk = wanted is None or len(wanted) > batch_accounts
    if bulk:
        refresh_statistics(engine)
    written_stats = threading.Event()

    def batches() -> Iterator[list[str]]:
        after = ""
        while True:
            if wanted is not None:
                batch = [a for a in wanted if a > after][:batch_accounts]
            else:
                with feed.reading(engine) as conn:
                    batch = list(conn.execute(_NEXT_ACCOUNTS, {"period": period, "after": after,
                                                               "limit": batch_accounts}).scalars())
            if not batch:
                return
            yield batch
            after = batch[-1]

    merge_lock = threading.Lock()

    def issue(batch: list[str]) -> None:
        part = IssueSummary(period)
        with engine.begin() as conn:
            _issue_batch(conn, batch, period, tariff, issued_at, today, due_date, part)
            if before_commit is not None:
                before_commit(batch)
        with merge_lock:
            _merge(summary, part)
            first = bulk and not written_stats.is_set()
            written_stats.set()
        if first:
            refresh_statistics(engine, _WRITTEN_STATS_TABLES)

    if workers == 1 or engine.dialect.name == "sqlite":
        for batch in batches():
            issue(batch)
        return summary
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="issue") as pool:
        running: set[Future[None]] = set()
        try:
            for batch in batches():
                if len(running) >= workers:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                running.add(pool.submit(issue, batch))
        finally:
            wait(running)
        for f in running:
            f.result()
    return summary


def _merge(into: IssueSummary, part: IssueSummary) -> None:
    into.bills += part.bills
    into.amount_fen += part.amount_fen
    into.prepaid_applied_fen += part.prepaid_applied_fen
    into.skipped_existing += part.skipped_existing
    for bank, n in part.fed.items():
        into.fed[bank] = into.fed.get(bank, 0) + n
    for bank, fen in part.fed_fen.items():
        into.fed_fen[bank] = into.fed_fen.get(bank, 0) + fen


class IssueSettings(YinDianSettings):
    db: str = Field("sqlite:///var/mis.db", description="SQLAlchemy URL of the MIS database")
    period: str = Field("", description="billing period YYYYMM")
    due_days: int = Field(20, description="days from issue to the due date")
    batch_accounts: int = Field(2_000, description="accounts issued per transaction")
    workers: int = Field(2, ge=1, le=ISSUE_WORKERS_MAX, description="batches issued at once, each on its own "
                                                                   "connection (SQLite: one)")
    clock_start: str = Field("", description="run the clock from this ISO instant (tests, demos)")
    timezone: str = Field(DEFAULT_TZ, description="the utility's time zone: business dates")
    migrate: bool = Field(True, description="upgrade the schema first")
    log_level: str = Field("INFO", description="log level")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mis_adapter issue-bills", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_flags(parser, IssueSettings)
    args = parser.parse_args(argv)
    s = load_settings(IssueSettings, args, args.config_file)
    setup_logging(s.log_level, "issue-bills")
    try:
        check_period(s.period)
    except InvalidField as exc:
        parser.error(str(exc))
    engine = make_engine(s.db)
    try:
        if s.migrate:
            upgrade(engine)
        summary = issue_bills(engine, make_clock(s.clock_start or None, s.timezone), s.period,
                              due_days=s.due_days, batch_accounts=s.batch_accounts, workers=s.workers)
    finally:
        engine.dispose()
    fed = " ".join(f"{b}={n}" for b, n in sorted(summary.fed.items())) or "none"
    print(f"issued period={summary.period} bills={summary.bills} amount_fen={summary.amount_fen} "
          f"prepaid_applied_fen={summary.prepaid_applied_fen} fed={fed} skipped_existing={summary.skipped_existing}")
    return 0
