"""`make bench-recon` (`python -m mis_adapter bench-recon`): reconciliation
and reports at scale, on SQLite and PostgreSQL. Prints figures; asserts
nothing about speed.

For each back end: a fresh MIS database with N accounts and one bank's day
of R payments, generated set-based (INSERT ... SELECT over a series); then a
real `mis_adapter serve` process is sent the bank's R records over the
Reconcile stream (with a few hundred discrepancies of each kind), and the
bench prints the seconds until the summary and the adapter's peak RSS. A
smaller run (--small-records, fresh process and day) shows whether memory
grows with the record count. Then B bills are generated and each report
(collections by every grouping, arrears summary, arrears detail) is timed."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import sqlalchemy as sa

from mis_adapter import reports
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.migrate import upgrade
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.bench_reference import copy_join_records_per_s
from yindian_common.clock import DEFAULT_TZ, ManualClock
from yindian_common.db import create_database, drop_database, make_engine
from yindian_common.fields import make_account_no

REPO = Path(__file__).resolve().parents[1]
READY_RE = re.compile(r"READY (\S+) grpc=(\S+) metrics=(\d+)")
STAGES_RE = re.compile(r"event=recon_stages .*?records=\d+ (.*)$")
TZ = ZoneInfo(DEFAULT_TZ)
BANK = "BENCH"
DAY = dt.date(2026, 11, 27)
CLOCK = "2026-11-28T09:00:00+08:00"
DISCREPANCY_EVERY = 10_000      # one record in this many is made a discrepancy of some kind
LATER_DAY = DAY - dt.timedelta(days=10)   # the --later-payments are settled on this day
PAST_AS_OF = DAY + dt.timedelta(days=1) - dt.timedelta(days=40)   # the past-date reports' as-of date
READY_TIMEOUT_S = 120.0
RECON_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Plan:
    accounts: list[str]
    records: int
    # records i with i % 1000 < bank_only_permille are the bank's only (the MIS never saw them)
    bank_only_permille: int = 0

    def bank_only(self, i: int) -> bool:
        return i % 1000 < self.bank_only_permille

    def account(self, i: int) -> str:
        return self.accounts[i % len(self.accounts)]

    @staticmethod
    def amount(i: int) -> int:
        return 1_000 + i % 5_000


# ---- data, set-based ----
def create_base(engine: sa.Engine, accounts: list[str]) -> None:
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO branches (code, name) VALUES ('01', 'bench')"))
        conn.execute(sa.text("INSERT INTO banks (bank_id, name, suspended, suspended_reason) "
                             "VALUES (:b, 'bench', false, '')"), {"b": BANK})
        conn.execute(sa.text("CREATE TABLE bench_accounts (i INTEGER PRIMARY KEY, account_no VARCHAR(10))"))
        conn.execute(sa.text("INSERT INTO bench_accounts (i, account_no) VALUES (:i, :a)"),
                     [{"i": i, "a": a} for i, a in enumerate(accounts)])
        conn.execute(sa.text(
            "INSERT INTO customers (account_no, branch_code, name, address, phone, tariff_class, status, "
            "prepaid_fen, opened_on) SELECT account_no, '01', '张三', '-', '13800000000', 'RESIDENTIAL', 'OPEN', 0, "
            ":d FROM bench_accounts").bindparams(sa.bindparam("d", type_=sa.Date)), {"d": dt.date(2020, 1, 1)})


def series(engine: sa.Engine, n: int) -> str:
    """A FROM item giving g(i) = 1..n."""
    if engine.dialect.name == "postgresql":
        return f"generate_series(1, {int(n)}) AS g(i)"
    return f"(WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {int(n)}) SELECT i FROM s) g"


def create_payments(engine: sa.Engine, plan: Plan, serial_prefix: str, day: dt.date) -> None:
    """The MIS's payments of the day: serial <prefix><i>, for i = 1..records."""
    n_acc = len(plan.accounts)
    cat = "||"
    sql = (f"INSERT INTO payments (bank_id, bank_serial, state, account_no, branch_code, amount_fen, channel, "
           f"outlet_code, teller_id, settlement_date, posted_at, arrears_after_fen, prepaid_after_fen, "
           f"prepaid_added_fen) "
           f"SELECT :bank, :prefix {cat} CAST(g.i AS VARCHAR(12)), 'POSTED', a.account_no, '01', 1000 + g.i % 5000, "
           f"'COUNTER', '0101', 'T1', :day, :at, 0, 0, 0 "
           f"FROM {series(engine, plan.records)} JOIN bench_accounts a ON a.i = g.i % {n_acc} "
           f"WHERE g.i % 1000 >= {int(plan.bank_only_permille)}")
    at = dt.datetime.combine(day, dt.time(12), TZ).astimezone(dt.UTC)
    params = {"bank": BANK, "prefix": serial_prefix, "day": day,
              "at": at.replace(tzinfo=None) if engine.dialect.name == "sqlite" else at}
    with engine.begin() as conn:
        conn.execute(sa.text(sql).bindparams(sa.bindparam("day", type_=sa.Date)), params)


def create_bills(engine: sa.Engine, plan: Plan, bills: int, arrears_permille: int = 1000) -> None:
    """`bills` bills over the accounts, ten periods each; in the households in
    arrears (account index i with i % 1000 < arrears_permille) one bill in five is unpaid."""
    n_acc = len(plan.accounts)
    periods = max(1, bills // n_acc)
    unpaid = f"((a.i + :k) % 5 = 0 AND a.i % 1000 < {int(arrears_permille)})"
    with engine.begin() as conn:
        for k in range(periods):
            y, m = divmod(2025 * 12 + 10 + k, 12)
            period = f"{y:04d}{m + 1:02d}"
            due = dt.date(y, m + 1, 25) + dt.timedelta(days=30)
            issued = dt.datetime.combine(due - dt.timedelta(days=20), dt.time(2), dt.UTC)
            sql = ("INSERT INTO bills (account_no, period, kwh, amount_fen, prepaid_applied_fen, principal_paid_fen, "
                   "late_fee_paid_fen, accrual_micro, accrual_date, due_date, issued_at, status, paid_on, dunning) "
                   "SELECT a.account_no, :period, 100 + a.i % 300, 5000 + a.i % 20000, 0, "
                   f"CASE WHEN {unpaid} THEN 0 ELSE 5000 + a.i % 20000 END, 0, 0, :due, :due, :issued, "
                   f"CASE WHEN {unpaid} THEN 'UNPAID' ELSE 'PAID' END, "
                   f"CASE WHEN {unpaid} THEN NULL ELSE :due END, false FROM bench_accounts a")
            conn.execute(sa.text(sql).bindparams(sa.bindparam("due", type_=sa.Date)), {
                "period": period, "k": k, "due": due,
                "issued": issued.replace(tzinfo=None) if engine.dialect.name == "sqlite" else issued})


def create_later_payments(engine: sa.Engine, n: int, day: dt.date) -> None:
    """`n` paid bills are made paid by a payment settled on `day` (one allocation each, the whole
    principal), so that a report as of an earlier date must undo those payments' effect."""
    if n <= 0:
        return
    pay, bill, alloc = (sa.table(t, *(sa.column(c) for c in cols)) for t, cols in (
        ("payments", ("bank_id", "bank_serial", "state", "account_no", "branch_code", "amount_fen", "channel",
                      "outlet_code", "teller_id", "settlement_date", "posted_at", "arrears_after_fen",
                      "prepaid_after_fen", "prepaid_added_fen", "payment_id")),
        ("bills", ("bill_id", "account_no", "amount_fen", "status", "paid_on", "accrual_date", "accrual_micro",
                   "due_date")),
        ("allocations", ("payment_id", "bill_id", "late_fee_fen", "principal_fen"))))
    at = dt.datetime.combine(day, dt.time(12), TZ).astimezone(dt.UTC)
    serial = sa.literal("L", sa.String) + sa.cast(bill.c.bill_id, sa.String(20))
    chosen = (sa.select(bill.c.bill_id).where(bill.c.status == "PAID").order_by(bill.c.bill_id).limit(n)
              .subquery("chosen"))
    picked = bill.join(chosen, chosen.c.bill_id == bill.c.bill_id)
    with engine.begin() as conn:
        conn.execute(pay.insert().from_select(
            ["bank_id", "bank_serial", "state", "account_no", "branch_code", "amount_fen", "channel", "outlet_code",
             "teller_id", "settlement_date", "posted_at", "arrears_after_fen", "prepaid_after_fen",
             "prepaid_added_fen"],
            sa.select(sa.literal(BANK), serial, sa.literal("POSTED"), bill.c.account_no, sa.literal("01"),
                      bill.c.amount_fen, sa.literal("COUNTER"), sa.literal("0101"), sa.literal("T1"),
                      sa.literal(day, sa.Date), sa.literal(at.replace(tzinfo=None) if engine.dialect.name == "sqlite"
                                                           else at, sa.DateTime(timezone=True)),
                      sa.literal(0), sa.literal(0), sa.literal(0)).select_from(picked)))
        conn.execute(alloc.insert().from_select(
            ["payment_id", "bill_id", "late_fee_fen", "principal_fen"],
            sa.select(pay.c.payment_id, bill.c.bill_id, sa.literal(0), bill.c.amount_fen)
            .select_from(picked.join(pay, sa.and_(pay.c.bank_id == BANK, pay.c.bank_serial == serial)))))
        conn.execute(bill.update().where(bill.c.bill_id.in_(sa.select(chosen.c.bill_id)))
                     .values(paid_on=sa.literal(day, sa.Date), accrual_date=sa.literal(day, sa.Date)))


def analyze(engine: sa.Engine) -> None:
    """Fresh planner statistics, as autovacuum would have them after a day's business."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("customers", "payments", "bills", "allocations"):
            conn.exec_driver_sql(f"ANALYZE TABLE {table}" if engine.dialect.name == "mysql" else f"ANALYZE {table}")


# ---- the bank's stream ----
def bank_batches(plan: Plan, serial_prefix: str, batch_records: int) -> list[bytes]:
    """The bank's records, pre-serialized (the bank's own cost is not the adapter's):
    every DISCREPANCY_EVERY-th record gets an amount off by one (MISMATCH), the
    next one is left out (UTILITY_ONLY), and as many unknown serials are added (BANK_ONLY)."""
    out: list[bytes] = []
    batch = pb.BankRecordBatch()
    for i in range(1, plan.records + 1):
        if i % DISCREPANCY_EVERY == 1 and i > 1 and not plan.bank_only(i):
            continue
        amount = plan.amount(i) + (1 if i % DISCREPANCY_EVERY == 0 and not plan.bank_only(i) else 0)
        batch.records.add(bank_serial=f"{serial_prefix}{i}", account_no=plan.account(i), amount_fen=amount,
                          status=pb.BANK_RECORD_STATUS_POSTED)
        if i % DISCREPANCY_EVERY == 0 and not plan.bank_only(i):
            batch.records.add(bank_serial=f"{serial_prefix}X{i}", account_no=plan.account(i), amount_fen=777,
                              status=pb.BANK_RECORD_STATUS_POSTED)
        if len(batch.records) >= batch_records:
            out.append(pb.ReconcileRequest(batch=batch).SerializeToString())
            batch = pb.BankRecordBatch()
    if batch.records:
        out.append(pb.ReconcileRequest(batch=batch).SerializeToString())
    return out


def stream(day: dt.date, batches: list[bytes]) -> Iterator[pb.ReconcileRequest]:
    yield pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=day.isoformat()))
    for b in batches:
        yield pb.ReconcileRequest.FromString(b)


# ---- the adapter process ----
class Adapter:
    def __init__(self, url: str, log_path: Path) -> None:
        self.log = open(log_path, "a")  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "mis_adapter", "serve", "--db", url, "--listen", "127.0.0.1:0",
             "--metrics-port", "0", "--insecure", "--clock-start", CLOCK, "--no-migrate",
             "--sqlite-synchronous", "NORMAL", "--max-message-bytes", str(16 * 1024 * 1024)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.addr = ""
        ready = threading.Event()

        def pump() -> None:
            assert self.popen.stdout is not None
            for line in self.popen.stdout:
                self.log.write(line)
                m = READY_RE.search(line)
                if m and not ready.is_set():
                    self.addr = m.group(2)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(READY_TIMEOUT_S) or not self.addr:
            self.popen.kill()
            raise SystemExit(f"mis_adapter did not become ready; see {log_path}")

    def rss_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def cpu_s(self) -> float:
        return _proc_cpu_s(self.popen.pid)

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(timeout=60)
        self.log.close()


def reconcile_once(url: str, work: Path, plan: Plan, prefix: str, day: dt.date, batch_records: int) -> dict[str, str]:
    batches = bank_batches(plan, prefix, batch_records)
    adapter = Adapter(url, work / "mis_adapter.log")
    try:
        rss_start = adapter.rss_kib("VmRSS")
        cpu_start, db_cpu = adapter.cpu_s(), BackendCpu(url)
        with grpc.insecure_channel(adapter.addr, options=[("grpc.max_send_message_length", 16 * 1024 * 1024),
                                                         ("grpc.max_receive_message_length", 16 * 1024 * 1024)]) as ch:
            stub = billing_pb2_grpc.BillingServiceStub(ch)
            started = time.perf_counter()
            lines = 0
            summary = None
            for resp in stub.Reconcile(stream(day, batches), metadata=(("x-yindian-bank-id", BANK),),
                                       timeout=RECON_TIMEOUT_S):
                if resp.WhichOneof("body") == "summary":
                    summary = resp.summary
                else:
                    lines += len(resp.discrepancies.discrepancies)
            seconds = time.perf_counter() - started
        peak = adapter.rss_kib("VmHWM")
        cpu, db = adapter.cpu_s() - cpu_start, db_cpu.stop()
    finally:
        adapter.stop()
    assert summary is not None
    stages = [m.group(1) for m in map(STAGES_RE.search, (work / "mis_adapter.log").read_text().splitlines()) if m]
    totals = " ".join(f"{pb.ReconcileOutcome.Name(t.outcome).removeprefix('RECONCILE_OUTCOME_')}={t.count}"
                      for t in summary.totals)
    return {"records": f"{summary.record_count:,}", "seconds": f"{seconds:.1f}",
            "records_per_s": f"{summary.record_count / seconds:,.0f}", "rss_start_mib": f"{rss_start / 1024:.0f}",
            "rss_peak_mib": f"{peak / 1024:.0f}", "discrepancy_lines": str(lines), "outcomes": totals,
            "adapter_cpu_s": f"{cpu:.1f}", **({"db_cpu_s": f"{db:.1f}"} if db is not None else {}),
            # the adapter's own wall seconds per stage of this close (recon.Reconciliation.stages)
            "stages": f"[{stages[-1]}]" if stages else "[]",
            "load": _load().replace(" ", "/")}


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU of a local process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BackendCpu:
    """PostgreSQL on this machine: the CPU of the backends connected to the bench database
    (the adapter's), sampled every SAMPLE_S from the start until stop(). A backend's CPU counts
    from its first sample (0 if it started after the first), up to its last; a backend living
    less than SAMPLE_S is missed, so the figure is a lower bound. None on other databases."""
    SAMPLE_S = 0.2

    def __init__(self, url: str) -> None:
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._engine = sa.create_engine(url, poolclass=sa.pool.NullPool) if url.startswith("postgresql") else None
        if self._engine is not None:
            self._sample(first=True)
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _sample(self, first: bool = False) -> None:
        assert self._engine is not None
        with self._engine.connect() as conn:
            pids = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                        "AND pid <> pg_backend_pid()")).scalars().all()
        for pid in pids:
            cpu = _proc_cpu_s(pid)
            self._first.setdefault(pid, cpu if first else 0.0)
            self._last[pid] = max(cpu, self._last.get(pid, 0.0))

    def _run(self) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            self._sample()

    def stop(self) -> float | None:
        if self._engine is None:
            return None
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample()
        self._engine.dispose()
        return sum(cpu - self._first[pid] for pid, cpu in self._last.items())


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# --snapshots: the arrears snapshots the reports read (arrears_snapshot.py): the day before today's reports and
# the month end before the past-date reports' as-of date, as the daily job and its retention would leave them
SNAPSHOT_DAYS = (DAY, PAST_AS_OF.replace(day=1) - dt.timedelta(days=1))


def take_snapshots(engine: sa.Engine) -> list[tuple[str, float, str]]:
    from mis_adapter import arrears_snapshot  # only here: the bench runs against code without it too

    clock = ManualClock(dt.datetime.fromisoformat(CLOCK))
    out = []
    for day in SNAPSHOT_DAYS:
        built = arrears_snapshot.build(engine, clock, day)
        out.append((f"arrears snapshot of {day}", built.seconds, f"{built.outcome}, {built.bills:,} bills"))
    return out


class ReportCpu:
    """CPU of a report, in seconds: this process's (the report's Python; SQLite runs in it) and the database
    server's for its connections (PostgreSQL: the backends this engine checked out; MariaDB: the whole
    mysqld process, which other clients of the server may share; SQLite: none)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.pids: set[int] = set()
        self.mysqld = 0
        if engine.dialect.name == "postgresql":
            sa.event.listen(engine, "checkout", lambda dbapi, _rec, _proxy: self.pids.add(dbapi.info.backend_pid))
        elif engine.dialect.name == "mysql":
            with engine.connect() as conn:
                pid_file = conn.exec_driver_sql("SELECT @@pid_file").scalar()
            try:
                self.mysqld = int(Path(str(pid_file)).read_text().strip())
            except (OSError, ValueError):
                self.mysqld = 0

    def now(self) -> tuple[float, float]:
        server = sum(_proc_cpu_s(p) for p in ([self.mysqld] if self.mysqld else self.pids))
        return time.process_time(), server


def time_reports(engine: sa.Engine) -> list[tuple[str, float, str]]:
    out = []
    rates = LateFeeRates()
    cpu = ReportCpu(engine)
    for g in reports.GROUP_BYS:
        t0 = time.perf_counter()
        rep = reports.collection_summary([engine], DAY - dt.timedelta(days=30), DAY, g)
        out.append((f"collections by {g}", time.perf_counter() - t0, f"{len(rep.rows)} rows, {rep.total.count:,} pays"))
    for label, as_of in (("", dt.date(2026, 11, 28)), (", 40 days ago", PAST_AS_OF)):
        t0, c0 = time.perf_counter(), cpu.now()
        arr = reports.arrears_summary([engine], as_of, rates, TZ)
        t, c1 = arr.total, cpu.now()
        out.append((f"arrears summary{label}", time.perf_counter() - t0,
                     f"{t.households:,} households, principal {t.principal_fen:,} fen, fees {t.late_fee_fen:,} fen; "
                     f"cpu client={c1[0] - c0[0]:.2f} server={c1[1] - c0[1]:.2f}"))
        t0, c0 = time.perf_counter(), cpu.now()
        n = principal = fees = 0
        for page in reports.arrears_detail([engine], as_of, rates, TZ):
            n += len(page)
            principal += sum(a.principal_fen for a in page)
            fees += sum(a.late_fee_fen for a in page)
        c1 = cpu.now()
        out.append((f"arrears detail{label}", time.perf_counter() - t0,
                    f"{n:,} accounts, principal {principal:,} fen, fees {fees:,} fen; "
                    f"cpu client={c1[0] - c0[0]:.2f} server={c1[1] - c0[1]:.2f}"))
    return out


# --keep-db: what the kept database was generated with; a run with other figures generates it again
_KEPT = sa.table("bench_generated", sa.column("what"))


def _kept_what(args: argparse.Namespace) -> str:
    return (f"accounts={args.accounts} bills={args.bills} arrears={round(args.arrears_share * 1000)} "
            f"later={args.later_payments}")


def _kept_url(backend: str, args: argparse.Namespace) -> tuple[str, bool]:
    """--keep-db: the kept database's URL and whether it already holds this run's data (reused as it is)."""
    name = args.keep_db
    if backend == "sqlite":
        path = Path(args.keep_dir) / f"{name}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
        if not path.exists():
            return url, False
    else:
        admin = sa.make_url(args.mariadb_admin_url if backend == "mariadb" else args.pg_admin_url)
        url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                what = conn.execute(sa.select(_KEPT.c.what)).scalar()
        finally:
            engine.dispose()
    except sa.exc.SQLAlchemyError:
        what = None
    if what == _kept_what(args):
        return url, True
    if backend == "sqlite":
        Path(args.keep_dir, f"{name}.db").unlink(missing_ok=True)
        return url, False
    return create_database(args.mariadb_admin_url if backend == "mariadb" else args.pg_admin_url, name), False


def _drop_snapshots(engine: sa.Engine) -> None:
    """A kept database's snapshots go before a run takes its own (the code measured builds them)."""
    with engine.begin() as conn:
        for table in ("arrears_snapshot_bills", "arrears_snapshots"):
            conn.exec_driver_sql(f"DELETE FROM {table}")


def run_backend(backend: str, args: argparse.Namespace, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    name = f"yd_bench_recon_{os.getpid()}"
    admin = args.mariadb_admin_url if backend == "mariadb" else args.pg_admin_url
    reused = False
    if args.keep_db:
        url, reused = _kept_url(backend, args)
    else:
        url = f"sqlite:///{work / 'mis.db'}" if backend == "sqlite" else create_database(admin, name)
    try:
        engine = make_engine(url, sqlite_synchronous="NORMAL")
        if reused:
            print(f"[{backend}] load={_load()} reusing {args.keep_db}: {_kept_what(args)}", flush=True)
            upgrade(engine)  # the code measured may have migrations the kept database has not had
            if args.snapshots:
                _drop_snapshots(engine)
        else:
            accounts = [make_account_no("01", i + 1) for i in range(args.accounts)]
            t0 = time.perf_counter()
            create_base(engine, accounts)
            plan = Plan(accounts, args.records, round(args.bank_only_share * 1000))
            small = Plan(accounts, args.small_records)
            if args.reconcile:
                create_payments(engine, small, "Q", DAY - dt.timedelta(days=1))
                create_payments(engine, plan, "S", DAY)
            create_bills(engine, plan, args.bills, round(args.arrears_share * 1000))
            create_later_payments(engine, args.later_payments, LATER_DAY)
            analyze(engine)
            if args.keep_db:
                with engine.begin() as conn:
                    conn.exec_driver_sql("CREATE TABLE bench_generated (what VARCHAR(200))")
                    conn.execute(_KEPT.insert().values(what=_kept_what(args)))
            print(f"[{backend}] load={_load()} generated {args.accounts:,} accounts, "
                  f"{(args.records + args.small_records) * args.reconcile + args.later_payments:,} payments, "
                  f"{args.bills:,} bills in {time.perf_counter() - t0:.1f} s", flush=True)
        runs = (("small", small, "Q", DAY - dt.timedelta(days=1)), ("full", plan, "S", DAY)) if args.reconcile else ()
        for label, p, prefix, day in runs:
            fig = reconcile_once(url, work, p, prefix, day, args.batch_records)
            print(f"[{backend}] reconcile {label}: " + " ".join(f"{k}={v}" for k, v in fig.items()), flush=True)
            if backend == "postgresql" and label == "full" and args.reference:
                ref = copy_join_records_per_s(args.pg_admin_url, p.records)
                ours = float(fig["records_per_s"].replace(",", ""))
                print(f"[{backend}] reference (COPY of the records + one matching join): records_per_s={ref:,.0f} "
                      f"ratio={ours / ref:.2f} load={_load()}", flush=True)
        if args.reports and args.snapshots:
            for title, seconds, what in take_snapshots(engine):
                print(f"[{backend}] {title}: seconds={seconds:.2f} ({what}) load={_load()}", flush=True)
        for title, seconds, what in (time_reports(engine) if args.reports else ()):
            print(f"[{backend}] report {title}: seconds={seconds:.2f} ({what}) load={_load()}", flush=True)
        engine.dispose()
    finally:
        if backend != "sqlite" and not args.keep_db:
            drop_database(admin, name)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mis_adapter bench-recon", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="sqlite,postgresql",
                   help="comma-separated: sqlite, postgresql, mariadb (reports only)")
    p.add_argument("--records", type=int, default=1_000_000, help="records of the bank's day")
    p.add_argument("--small-records", type=int, default=100_000, help="records of the comparison run")
    p.add_argument("--accounts", type=int, default=100_000, help="accounts the payments and bills spread over")
    p.add_argument("--bills", type=int, default=1_000_000, help="bills for the report timings")
    p.add_argument("--batch-records", type=int, default=5_000, help="records per stream message")
    p.add_argument("--bank-only-share", type=float, default=0.0,
                   help="share of the full run's records the MIS never saw (BANK_ONLY), 0..1")
    p.add_argument("--arrears-share", type=float, default=1.0,
                   help="share of households with unpaid bills in the report data, 0..1")
    p.add_argument("--later-payments", type=int, default=0,
                   help="paid bills made paid by a payment after the past-date reports' as-of date")
    p.add_argument("--reports-only", dest="reconcile", action="store_false",
                   help="skip the reconciliation runs (reports only; the only choice on mariadb)")
    p.add_argument("--no-reports", dest="reports", action="store_false",
                   help="skip the report timings (reconciliation only)")
    p.add_argument("--snapshots", action="store_true",
                   help="take the arrears snapshots (arrears-snapshot) before the report timings: the day before "
                        "today and the month end before the past-date reports' as-of date")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the same-run PostgreSQL reference")
    p.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--mariadb-admin-url", default="mysql://root@127.0.0.1:3306/mysql")
    p.add_argument("--work-dir", default="var/bench-recon")
    p.add_argument("--keep-db", default="",
                   help="reports only: generate the data into this database (SQLite: NAME.db in --keep-dir), keep it "
                        "after the run, and reuse it as it is in a later run with the same --accounts, --bills, "
                        "--arrears-share and --later-payments (snapshots are dropped and taken again); drop it "
                        "yourself when done")
    p.add_argument("--keep-dir", default="var/bench-recon-kept", help="where --keep-db keeps SQLite databases")
    args = p.parse_args(argv)
    if "mariadb" in args.backends and args.reconcile:
        p.error("mariadb: reports only (--reports-only)")
    if args.keep_db and args.reconcile:
        p.error("--keep-db: reports only (--reports-only)")
    work = Path(args.work_dir)
    work = work if work.is_absolute() else REPO / work
    if work.exists():
        shutil.rmtree(work)
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        run_backend(backend, args, work / backend)
    return 0
