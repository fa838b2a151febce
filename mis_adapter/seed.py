"""`python -m mis_adapter seed`: generates a realistic utility — branches,
banks, N households with names, addresses and phones, a meter each, 12
months of readings and bills (the last month's readings left unbilled for
`issue-bills`), a share of households in arrears with late fees running,
some prepaid credit, and auto-debit agreements spread over the banks — and
writes each bank's agreement roster to `<roster-dir>/<bank_id>.csv`.

Deterministic for a given --random-seed and clock. Bulk inserts in batches."""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import datetime as dt
import functools
import operator
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter.agreements import SignCommand, sign_many_in_tx
from mis_adapter.db.base import table_of
from mis_adapter.db.core import Bank, BillRow, Branch, Customer, Meter, PrepaidEntry, Reading
from mis_adapter.migrate import upgrade
from mis_adapter.routing import BranchRouter
from mis_adapter.tariff import COMMERCIAL, INDUSTRIAL, RESIDENTIAL, price_fen
from yindian_common.clock import DEFAULT_TZ, business_date, make_clock, utc_now
from yindian_common.fields import make_account_no

BATCH_ROWS = 5_000
HOUSEHOLDS_PER_CHUNK = 5_000
GENERATED_AHEAD_MAX = 1  # chunks generated and waiting to be loaded
HISTORY_MONTHS = 12
BRANCHES = [("01", "城东供电所"), ("02", "城西供电所"), ("03", "城南供电所"), ("04", "城北供电所"),
            ("05", "开发区供电所"), ("06", "高新区供电所"), ("07", "东郊供电所"), ("08", "西郊供电所")]
BANKS = [("ICBC", "中国工商银行"), ("ABC", "中国农业银行"), ("BOC", "中国银行"), ("CCB", "中国建设银行")]
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰萍红建国志文斌辉鹏宇浩然思雨欣怡子轩梓涵"
STREETS = ["人民路", "解放路", "中山路", "建设路", "和平街", "新华街", "胜利路", "光明路", "长江路", "黄河路"]
DUE_DAY = 25  # bills of period M are issued on the 5th of M+1 and due on the 25th
ISSUE_DAY = 5
SEED_AGREEMENT_START = dt.date(2020, 1, 1)
# Tables the seed bulk-loads, and those the agreements are signed into; on a fresh PostgreSQL
# database their secondary indexes and unique/foreign keys are built once after the load
# (deferred_keys). The primary keys the signing looks up and upserts by stay.
BULK_TABLES = ("customers", "meters", "readings", "bills", "prepaid_ledger",
               "agreement_records", "agreements", "journal")
# Of those, the tables whose primary keys nothing reads during the load: built after it too.
PK_DEFERRED_TABLES = ("meters", "readings", "bills", "prepaid_ledger", "journal")
REBUILD_WORK_MEM = "256MB"  # maintenance_work_mem while the deferred indexes are sorted (per connection)
# PostgreSQL: the two largest tables, loaded on a second connection while the rest of the same chunk
# loads on the first (when the seed numbers their ids itself: their rows then wait on nothing).
SIDE_TABLES = ("readings", "bills")
REBUILD_CONNECTIONS = 2  # PostgreSQL: connections the deferred indexes and keys are built on at once


def periods_before(today: dt.date, n: int) -> list[str]:
    """The n complete months before today's month, oldest first, as YYYYMM."""
    y, m = today.year, today.month
    out = []
    for _ in range(n):
        m -= 1
        if m == 0:
            y, m = y - 1, 12
        out.append(f"{y:04d}{m:02d}")
    return out[::-1]


@functools.lru_cache(maxsize=1024)
def next_month_day(period: str, day: int) -> dt.date:
    y, m = int(period[:4]), int(period[4:])
    y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return dt.date(y, m, day)


@functools.lru_cache(maxsize=65536)
def _price_fen(kwh: int, tariff_class: str) -> int:
    """price_fen at the default tariff; the seed prices the same few thousand (kWh, class) pairs a million times."""
    return price_fen(kwh, tariff_class)


def bulk_insert(engine: Engine, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """bulk_insert_rows for rows given as dicts (every dict with the same keys)."""
    if not rows:
        return
    cols = tuple(rows[0].keys())
    values = operator.itemgetter(*cols)
    bulk_insert_rows(engine, table, cols, [values(r) for r in rows] if len(cols) > 1 else [(r[cols[0]],) for r in rows])


def bulk_insert_rows(engine: Engine, table: sa.Table, cols: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Rows given as tuples in `cols` order. Driver-level executemany in
    batches: SQLAlchemy's per-row parameter processing costs more than the
    inserts themselves at this volume. PostgreSQL: COPY (executemany there is
    a round trip per row)."""
    if not rows:
        return
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            copy_rows(conn, table, cols, rows)
        return
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    q = engine.dialect.identifier_preparer.quote
    sql = (f"INSERT INTO {q(table.name)} ({', '.join(q(c) for c in cols)}) "
           f"VALUES ({', '.join([mark] * len(cols))})")
    converters = []
    if engine.dialect.name == "sqlite":  # SQLAlchemy's SQLite storage formats (instants in UTC)
        for i, c in enumerate(cols):
            if isinstance(table.c[c].type, sa.DateTime):
                converters.append((i, _sqlite_datetime))
            elif isinstance(table.c[c].type, sa.Date):
                converters.append((i, _sqlite_date))
    for start in range(0, len(rows), BATCH_ROWS):
        batch = rows[start:start + BATCH_ROWS]
        if converters:
            converted = []
            for r in batch:
                values = list(r)
                for i, conv in converters:
                    values[i] = conv(values[i])
                converted.append(tuple(values))
            batch = converted
        with engine.begin() as conn:
            conn.exec_driver_sql(sql, batch)  # type: ignore[arg-type]


def copy_rows(conn: sa.Connection, table: sa.Table, cols: tuple[str, ...], rows: list[tuple[Any, ...]],
              *, freeze: bool = False) -> None:
    """PostgreSQL: COPY FROM STDIN (psycopg) in the caller's transaction, in
    the binary format: the server then reads each value as it stores it
    instead of parsing text (numbers, dates, instants). `freeze`: COPY FREEZE
    (the table must have been created or truncated in this transaction)."""
    types = [_pg_binary_type(conn.engine, table.c[c].type) for c in cols]
    driver = conn.connection.driver_connection
    assert driver is not None
    options = "FORMAT BINARY, FREEZE" if freeze else "FORMAT BINARY"
    sql = f"COPY {table.name} ({', '.join(cols)}) FROM STDIN ({options})"
    with driver.cursor() as cur, cur.copy(sql) as copy:
        copy.set_types(types)
        write = copy.write_row
        for r in rows:
            write(r)


def _pg_binary_type(engine: Engine | sa.Connection, column_type: sa.types.TypeEngine[Any]) -> str:
    """The PostgreSQL type name a column's values are sent as in a binary COPY
    (which needs the exact type): its DDL name without the length."""
    return column_type.compile(dialect=engine.dialect).split("(")[0].lower()


@functools.lru_cache(maxsize=4096)
def _sqlite_date(v: dt.date | None) -> str | None:
    return None if v is None else v.isoformat()


@functools.lru_cache(maxsize=4096)
def _sqlite_datetime(v: dt.datetime | None) -> str | None:
    return None if v is None else v.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def seed(router: BranchRouter, accounts: int, roster_dir: Path, *, today: dt.date, now: dt.datetime,
         rng_seed: int = 20261128, agreement_share: float = 0.6, arrears_share: float = 0.08) -> dict[str, int]:
    rng = random.Random(rng_seed)
    for engine in router.engines():
        upgrade(engine)
        with engine.connect() as conn:
            if conn.execute(sa.select(sa.func.count()).select_from(table_of(Customer))).scalar_one():
                raise SystemExit(f"{engine.url.render_as_string(hide_password=True)} is already seeded")
    billed = periods_before(today, HISTORY_MONTHS)
    unbilled = f"{today.year:04d}{today.month:02d}"
    with router.primary.begin() as conn:
        conn.execute(sa.insert(table_of(Bank)), [{"bank_id": b, "name": n, "suspended": False,
                                                  "suspended_reason": "", "updated_at": now} for b, n in BANKS])
    for engine in router.engines():
        with engine.begin() as conn:
            conn.execute(sa.insert(table_of(Branch)), [{"code": c, "name": n} for c, n in BRANCHES])

    rosters: dict[str, list[str]] = {b: [] for b, _ in BANKS}
    counts = {"customers": 0, "bills": 0, "readings": 0, "agreements": 0, "arrears_households": 0}
    per_branch_serial = {c: 0 for c, _ in BRANCHES}
    households = []
    for _ in range(accounts):
        branch = BRANCHES[rng.randrange(len(BRANCHES))][0]
        per_branch_serial[branch] += 1
        acct = make_account_no(branch, per_branch_serial[branch])
        r = rng.random()
        cls = RESIDENTIAL if r < 0.90 else (COMMERCIAL if r < 0.97 else INDUSTRIAL)
        households.append((acct, branch, cls))

    by_engine: dict[Engine, list[tuple[str, str, str]]] = {}
    for h in households:
        by_engine.setdefault(router.engine_for(h[0]), []).append(h)

    first_ids = {engine: _next_ids(engine) for engine in by_engine}
    next_ids = {engine: None if ids is None else list(ids) for engine, ids in first_ids.items()}

    def chunks() -> Iterator[_Chunk]:  # memory stays flat in N: at most GENERATED_AHEAD_MAX chunks wait
        for engine, hs in by_engine.items():
            for start in range(0, len(hs), HOUSEHOLDS_PER_CHUNK):
                yield _generate(engine, hs[start:start + HOUSEHOLDS_PER_CHUNK], rng, billed, unbilled, today, now,
                                agreement_share, arrears_share, rosters, counts, next_ids[engine])

    with contextlib.ExitStack() as stack:
        for engine in by_engine:
            stack.enter_context(deferred_keys(engine))
        with _SideLoader() as side:
            for chunk in _ahead(chunks()):
                _load(chunk, today, now, counts, side)
        for engine, ids in next_ids.items():
            _advance_sequences(engine, first_ids[engine], ids)

    roster_dir.mkdir(parents=True, exist_ok=True)
    for bank_id, accts in rosters.items():
        with open(roster_dir / f"{bank_id}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["account_no"])
            w.writerows([a] for a in sorted(accts))
    return counts


# The tables whose generated keys the seed numbers itself on PostgreSQL (the database would
# otherwise call nextval once per row: 1M bills and 1.08M readings), and their key columns.
NUMBERED = (("readings", "reading_id"), ("bills", "bill_id"), ("prepaid_ledger", "entry_id"))


def _next_ids(engine: Engine) -> list[int] | None:
    """PostgreSQL: the id each NUMBERED table's sequence would give next (read,
    not drawn), in NUMBERED order; None elsewhere (the database numbers the
    rows as they are inserted)."""
    if engine.dialect.name != "postgresql":
        return None
    out = []
    with engine.connect() as conn:
        for table, column in NUMBERED:
            start, step, last = conn.exec_driver_sql(
                "SELECT s.start_value, s.increment_by, s.last_value FROM pg_sequences s "
                "WHERE format('%%I.%%I', s.schemaname, s.sequencename)::regclass = "
                "pg_get_serial_sequence(%s, %s)::regclass", (table, column)).one()
            if step != 1:
                return None
            out.append(int(start) if last is None else int(last) + 1)
    return out


def _advance_sequences(engine: Engine, first: list[int] | None, after: list[int] | None) -> None:
    """After the load: each NUMBERED sequence that numbered rows stands where
    nextval per row would have left it (the last id given); the others untouched."""
    if first is None or after is None:
        return
    with engine.begin() as conn:
        for (table, column), a, b in zip(NUMBERED, first, after, strict=True):
            if b != a:
                conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence(%s, %s), %s)", (table, column, b - 1))


def _ahead(chunks: Iterator[_Chunk]) -> Iterator[_Chunk]:
    """The chunks, generated by a thread while the previous ones load: the
    generator runs while the loader waits on the database."""
    q: queue.Queue[_Chunk | BaseException | None] = queue.Queue(maxsize=GENERATED_AHEAD_MAX)
    stop = threading.Event()

    def produce() -> None:
        try:
            for c in chunks:
                while not stop.is_set():
                    try:
                        q.put(c, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as exc:  # handed to the loader, which raises it
            q.put(exc)

    threading.Thread(target=produce, name="seed-generate", daemon=True).start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# The unique and foreign keys of BULK_TABLES, the primary keys of PK_DEFERRED_TABLES and the foreign
# keys (of any table) that reference those: foreign keys first (contype f < p < u).
_PG_KEYS = ("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), contype FROM pg_constraint "
            "WHERE (conrelid = ANY(%(bulk)s::regclass[]) AND contype IN ('f', 'u')) "
            "OR (conrelid = ANY(%(pk)s::regclass[]) AND contype = 'p') "
            "OR (confrelid = ANY(%(pk)s::regclass[]) AND contype = 'f') ORDER BY contype, conname")
_PG_PLAIN_INDEXES = ("SELECT i.indrelid::regclass::text, i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) "
                     "FROM pg_index i "
                     "WHERE i.indrelid = ANY(%s::regclass[]) AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
                     "WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x')) ORDER BY 1")


@contextlib.contextmanager
def deferred_keys(engine: Engine) -> Iterator[None]:
    """PostgreSQL (the seed runs only on an empty database): the secondary
    indexes and the unique and foreign keys of BULK_TABLES, and the primary
    keys of PK_DEFERRED_TABLES (with the foreign keys that reference them),
    are dropped for the bulk load and rebuilt after it, also when the load
    fails: one sort per index and one validating pass per key instead of a
    B-tree insert and a key lookup per row. The primary keys agreements are
    signed against (customers, agreements, agreement_records) stay. The
    indexes, unique and primary keys are built on REBUILD_CONNECTIONS
    connections at once (each table's on one), then the foreign keys.
    Elsewhere nothing changes."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.begin() as conn:
        keys = conn.exec_driver_sql(_PG_KEYS, {"bulk": list(BULK_TABLES), "pk": list(PK_DEFERRED_TABLES)}).all()
        indexes = conn.exec_driver_sql(_PG_PLAIN_INDEXES, (list(BULK_TABLES),)).all()
        for table, name, _definition, _kind in keys:
            conn.exec_driver_sql(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for _table, name, _definition in indexes:
            conn.exec_driver_sql(f"DROP INDEX {name}")
    try:
        yield
    finally:
        # Each table's indexes, unique and primary keys (one sort each), the tables shared out over
        # REBUILD_CONNECTIONS connections by size; then the foreign keys, which read the keys they
        # reference, on one connection.
        builds: dict[str, list[str]] = {}
        for table, _name, definition in indexes:
            builds.setdefault(table, []).append(definition)
        for table, name, definition, kind in reversed(keys):  # unique before primary keys
            if kind != "f":
                builds.setdefault(table, []).append(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        with engine.connect() as conn:
            sizes = {str(t): int(n) for t, n in conn.exec_driver_sql(_PG_SIZES, (list(builds),))}
        shares: list[list[str]] = [[] for _ in range(REBUILD_CONNECTIONS)]
        weights = [0] * REBUILD_CONNECTIONS
        for table in sorted(builds, key=lambda t: (-sizes.get(t, 0) * len(builds[t]), t)):
            lightest = weights.index(min(weights))
            shares[lightest] += builds[table]
            weights[lightest] += sizes.get(table, 0) * len(builds[table])
        with concurrent.futures.ThreadPoolExecutor(REBUILD_CONNECTIONS, thread_name_prefix="seed-keys") as pool:
            for done in [pool.submit(_rebuild, engine, share) for share in shares if share]:
                done.result()
        _rebuild(engine, [f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'
                          for table, name, definition, kind in reversed(keys) if kind == "f"])


_PG_SIZES = "SELECT t, pg_relation_size(t::regclass) FROM unnest(%s::text[]) AS t"


def _rebuild(engine: Engine, statements: list[str]) -> None:
    """Runs index and key builds in one transaction of their own connection."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"SET LOCAL maintenance_work_mem = '{REBUILD_WORK_MEM}'")
        for sql in statements:
            conn.exec_driver_sql(sql)


@dataclass
class _Chunk:
    """One chunk of households, generated, to be loaded into `engine`: per
    table its columns and rows as tuples in that column order."""
    engine: Engine
    tables: list[tuple[sa.Table, tuple[str, ...], list[tuple[Any, ...]]]]
    agreements: list[SignCommand]
    numbered: bool  # the rows carry their ids (NUMBERED), so no table waits on another's sequence


CUSTOMER_COLS = ("account_no", "branch_code", "name", "address", "phone", "tariff_class", "status", "prepaid_fen",
                 "opened_on")
METER_COLS = ("meter_no", "account_no", "installed_on")
READING_COLS = ("reading_id", "meter_no", "account_no", "period", "register_kwh", "kwh", "read_on", "billed")
BILL_COLS = ("bill_id", "account_no", "period", "kwh", "amount_fen", "prepaid_applied_fen", "principal_paid_fen",
             "late_fee_paid_fen", "accrual_micro", "accrual_date", "due_date", "issued_at", "status", "paid_on",
             "dunning")
PREPAID_COLS = ("entry_id", "account_no", "reason", "delta_fen", "balance_after_fen", "payment_id", "bill_id", "at")
KWH_LOW, KWH_HIGH = 0.6, 1.5  # a month's consumption: base × uniform(KWH_LOW, KWH_HIGH)
PAID_DAYS_BEFORE_DUE = 15  # a paid bill was paid 0..14 days before its due date (or today)
INSTALLED_ON = dt.date(2015, 1, 1)


def _generate(engine: Engine, hs: list[tuple[str, str, str]], rng: random.Random, billed: list[str],
              unbilled: str, today: dt.date, now: dt.datetime, agreement_share: float, arrears_share: float,
              rosters: dict[str, list[str]], counts: dict[str, int], next_ids: list[int] | None) -> _Chunk:
    """Rows built as tuples straight in column order (1M bills: no dict per row
    to build and pick apart again); the random draws in the same order as
    ever (rng.uniform(a, b) is a + (b - a) * rng.random(), inlined).
    `next_ids` (PostgreSQL, NUMBERED order, advanced here): readings, bills
    and prepaid entries carry their ids, numbered as nextval would have."""
    customers: list[tuple[Any, ...]] = []
    meters: list[tuple[Any, ...]] = []
    readings: list[tuple[Any, ...]] = []
    bills: list[tuple[Any, ...]] = []
    prepaid: list[tuple[Any, ...]] = []
    agreements: list[SignCommand] = []
    rnd, randrange, choice, randint = rng.random, rng.randrange, rng.choice, rng.randint
    kwh_span = KWH_HIGH - KWH_LOW
    reading_id, bill_id, entry_id = next_ids or (1, 1, 1)
    n_billed = len(billed)
    # per billed month, the same for every household: index, period, read on, due date, issued at, and
    # the dates a paid bill may have been paid on (by the days drawn before its due date or today)
    months = [(i, period, next_month_day(period, 1) - dt.timedelta(days=1), next_month_day(period, DUE_DAY),
               dt.datetime.combine(next_month_day(period, ISSUE_DAY), dt.time(2, 0), dt.UTC),
               [min(next_month_day(period, DUE_DAY), today) - dt.timedelta(days=d)
                for d in range(PAID_DAYS_BEFORE_DUE)])
              for i, period in enumerate(billed)]
    for acct, branch, cls in hs:
        name = choice(SURNAMES) + "".join(choice(GIVEN) for _ in range(choice((1, 2))))
        phone = "1" + choice("3456789") + "".join(str(randrange(10)) for _ in range(9))
        address = f"{choice(STREETS)}{randrange(1, 999)}号{randrange(1, 30)}栋{randrange(101, 2999)}室"
        meter = f"M{acct}"
        meters.append((meter, acct, INSTALLED_ON))
        in_arrears = rnd() < arrears_share
        unpaid_months = randint(1, 4) if in_arrears else 0
        counts["arrears_households"] += 1 if in_arrears else 0
        first_unpaid = n_billed - unpaid_months
        any_unpaid = False
        register = randrange(1000, 50000)
        base = randint(80, 400) if cls == RESIDENTIAL else randint(500, 6000)
        for i, period, read_on, due, issued_at, paid_on in months:
            kwh = max(0, int(base * (KWH_LOW + kwh_span * rnd())))
            register += kwh
            readings.append((reading_id, meter, acct, period, register, kwh, read_on, True))
            reading_id += 1
            amount = _price_fen(kwh, cls)
            if i >= first_unpaid or due >= today:
                any_unpaid = True
                bills.append((bill_id, acct, period, kwh, amount, 0, 0, 0, 0, due, due, issued_at, "UNPAID", None,
                              False))
            else:
                bills.append((bill_id, acct, period, kwh, amount, 0, amount, 0, 0, due, due, issued_at, "PAID",
                              paid_on[randrange(0, PAID_DAYS_BEFORE_DUE)], False))
            bill_id += 1
        kwh = max(0, int(base * (KWH_LOW + kwh_span * rnd())))  # this month's reading, not billed yet
        readings.append((reading_id, meter, acct, unbilled, register + kwh, kwh, today, False))
        reading_id += 1
        # prepaid credit only where no bill is unpaid: credit is applied to bills as they are issued
        prepaid_fen = choice((0, 0, 0, 0, 0, 0, 0, 0, 1000, 5000)) if cls == RESIDENTIAL and not any_unpaid else 0
        customers.append((acct, branch, name, address, phone, cls, "OPEN", prepaid_fen,
                          dt.date(2015 + randrange(10), 1 + randrange(12), 1)))
        if prepaid_fen:
            prepaid.append((entry_id, acct, "MIGRATED", prepaid_fen, prepaid_fen, None, None, now))
            entry_id += 1
        if rnd() < agreement_share:
            bank = BANKS[randrange(len(BANKS))][0]
            agreements.append(seed_agreement(bank, acct))
            rosters[bank].append(acct)
    numbered = [(table_of(Reading), READING_COLS, readings), (table_of(BillRow), BILL_COLS, bills),
                (table_of(PrepaidEntry), PREPAID_COLS, prepaid)]
    if next_ids is None:  # the database numbers them: the id column left out
        numbered = [(t, cols[1:], [r[1:] for r in rows]) for t, cols, rows in numbered]
    else:
        next_ids[:] = [reading_id, bill_id, entry_id]
    return _Chunk(engine, [(table_of(Customer), CUSTOMER_COLS, customers), (table_of(Meter), METER_COLS, meters),
                           *numbered], agreements, next_ids is not None)


class _SideLoader:
    """PostgreSQL: a second thread (and connection) loading SIDE_TABLES of one chunk while the
    first loads the rest: the two COPYs keep two server processes busy instead of one. At most
    one chunk's side tables are in flight (memory stays flat); a failure is raised to the loader
    at its next chunk or at the end."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seed-side-load")
        self._pending: concurrent.futures.Future[None] | None = None

    def __enter__(self) -> _SideLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def submit(self, engine: Engine, tables: list[tuple[sa.Table, tuple[str, ...], list[tuple[Any, ...]]]]) -> None:
        self.wait()
        self._pending = self._pool.submit(_insert_tables, engine, tables)


def _insert_tables(engine: Engine, tables: list[tuple[sa.Table, tuple[str, ...], list[tuple[Any, ...]]]]) -> None:
    for table, cols, rows in tables:
        bulk_insert_rows(engine, table, cols, rows)


def _load(chunk: _Chunk, today: dt.date, now: dt.datetime, counts: dict[str, int], side: _SideLoader) -> None:
    here = chunk.tables
    if chunk.numbered and chunk.engine.dialect.name == "postgresql":
        side.submit(chunk.engine, [t for t in chunk.tables if t[0].name in SIDE_TABLES])
        here = [t for t in chunk.tables if t[0].name not in SIDE_TABLES]
    _insert_tables(chunk.engine, here)
    for table, _cols, rows in chunk.tables:
        if table.name in counts:
            counts[table.name] += len(rows)
    # Agreements through the path SignAgreement takes (records, the accounts' index rows, journal).
    with chunk.engine.begin() as conn:
        sign_many_in_tx(conn, chunk.agreements, today, now)
    counts["agreements"] += len(chunk.agreements)


def seed_agreement(bank_id: str, account_no: str) -> SignCommand:
    """A migrated agreement: feeding since SEED_AGREEMENT_START, serial and passbook named by the account."""
    return SignCommand(bank_id=bank_id, agreement_serial=f"SEED-{account_no}", account_no=account_no,
                       savings_account_ref=f"PB-{account_no}", debit_limit_fen=None,
                       start_date=SEED_AGREEMENT_START)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mis_adapter seed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="SQLAlchemy URL of the MIS database")
    p.add_argument("--branch-db", action="append", default=[], help="CODE=URL (repeatable)")
    p.add_argument("--accounts", type=int, default=10_000, help="households to generate")
    p.add_argument("--roster-dir", required=True, help="where <bank_id>.csv agreement rosters are written")
    p.add_argument("--random-seed", type=int, default=20261128)
    p.add_argument("--clock-start", default="", help="seed as of this ISO instant (default: now)")
    p.add_argument("--timezone", default=DEFAULT_TZ)
    p.add_argument("--agreement-share", type=float, default=0.6, help="share of households with auto-debit")
    p.add_argument("--arrears-share", type=float, default=0.08, help="share of households in arrears")
    args = p.parse_args(argv)
    if not 1 <= args.accounts <= 9_000_000:
        p.error("--accounts must be between 1 and 9,000,000")
    clock = make_clock(args.clock_start or None, args.timezone)
    router = BranchRouter.from_specs(args.db, args.branch_db, sqlite_synchronous="NORMAL")
    t0 = time.monotonic()
    counts = seed(router, args.accounts, Path(args.roster_dir), today=business_date(clock), now=utc_now(clock),
                  rng_seed=args.random_seed, agreement_share=args.agreement_share, arrears_share=args.arrears_share)
    router.dispose()
    print("seeded " + " ".join(f"{k}={v}" for k, v in counts.items()) + f" seconds={time.monotonic() - t0:.1f}")
    return 0
