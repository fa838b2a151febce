"""`make bench-feed`: the bill feed end to end on SQLite and PostgreSQL.

For each back end: a fresh MIS database with N households that each have a
meter reading for one period and an auto-debit agreement at one bank, a
bank core whose passbooks cover most bills; then mis_adapter and a bridge
are started as real processes, `bank_sim autodebit` consumes the feed
through the bridge, and bills are issued. Printed per back end: bills per
second issued, delivered (first notice to last), debited at the bank,
acknowledged (cursor) and posted (payments), and the issue-to-notice
latency p50/p99 measured by a probe of small issuing transactions.

The MIS side is driven only through its CLI (`mis_adapter bench-data
populate|issue|probe`, `mis_adapter serve`, `bridge serve`); the check reads
the MIS over SQL through bank_sim's own table declarations (bank_sim.mis_tables)."""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.engine import Engine

from bank_sim import autodebit, ledger, mis_tables
from bank_sim.processes import run_command, start_server
from yindian_common.bench_reference import REFERENCE_BATCH_BILLS, bulk_write_bills_per_s
from yindian_common.clock import SystemClock
from yindian_common.db import create_database, drop_database, make_engine
from yindian_common.fields import make_account_no
from yindian_common.settings import YinDianSettings, add_settings_flags, load_settings

PASSBOOK_BATCH_ROWS = 10_000
BRANCH = "01"  # the branch `mis_adapter bench-data populate` opens its households in


def bench_accounts(n: int, first_serial: int = 1) -> list[str]:
    """The account numbers `mis_adapter bench-data populate` gives n households."""
    return [make_account_no(BRANCH, first_serial + i) for i in range(n)]


def open_passbooks(engine: Engine, bank_id: str, accounts: Sequence[str], *, now: dt.datetime,
                   short_share: float = 0.1, rng_seed: int = 11) -> None:
    """A passbook per account: most hold plenty, a `short_share` hold nothing."""
    autodebit.create_schema(engine)
    rng = random.Random(rng_seed)
    rows = []
    for acct in accounts:
        bal = 0 if rng.random() < short_share else 10_000_000
        rows.append({"bank_id": bank_id, "account_no": acct, "opening_balance_fen": bal, "balance_fen": bal,
                     "opened_at": now})
    for start in range(0, len(rows), PASSBOOK_BATCH_ROWS):
        with engine.begin() as conn:
            conn.execute(sa.insert(ledger.savings), rows[start:start + PASSBOOK_BATCH_ROWS])


@dataclass
class FeedCheck:
    """Both sides of the feed, counted; `problems` lists every broken invariant."""
    bills: int = 0
    fed: int = 0
    paid_by_debit: int = 0
    paid_fen: int = 0
    dunning: int = 0
    bank_debits: int = 0
    bank_debit_fen: int = 0
    bank_insufficient: int = 0
    cursor: int = 0
    problems: list[str] = field(default_factory=list)


def check_feed(mis: Engine, bank: Engine, bank_id: str, period: str) -> FeedCheck:
    """Every fed bill is paid by exactly one AUTO_DEBIT payment that matches
    one bank debit (serial, account, fen), or is in arrears for dunning with
    an INSUFFICIENT_FUNDS result on both sides; no passbook is debited twice."""
    c = FeedCheck()
    ob, bills, pay, alloc, res, cur = (mis_tables.feed_outbox, mis_tables.bills, mis_tables.payments,
                                       mis_tables.allocations, mis_tables.feed_results, mis_tables.feed_cursors)
    with mis.connect() as conn:
        c.bills = conn.execute(sa.select(sa.func.count()).select_from(bills).where(bills.c.period == period)).scalar_one()
        fed = {r.seq: r for r in conn.execute(sa.select(ob).where(ob.c.bank_id == bank_id))}
        c.fed = len(fed)
        results = {r.seq: r for r in conn.execute(sa.select(res).where(res.c.bank_id == bank_id))}
        auto = {r.bank_serial: r for r in conn.execute(
            sa.select(pay).where(pay.c.bank_id == bank_id, pay.c.channel == "AUTO_DEBIT"))}
        allocs: dict[int, list[int]] = {}
        for r in conn.execute(sa.select(alloc.c.bill_id, alloc.c.payment_id)):
            allocs.setdefault(r.bill_id, []).append(r.payment_id)
        status = {r.bill_id: (r.status, r.dunning) for r in conn.execute(
            sa.select(bills.c.bill_id, bills.c.status, bills.c.dunning).where(bills.c.period == period))}
        c.cursor = int(conn.execute(sa.select(cur.c.acked_through_seq)
                                    .where(cur.c.bank_id == bank_id)).scalar_one_or_none() or 0)
    with bank.connect() as conn:
        debits = {r.bank_serial: r for r in conn.execute(
            sa.select(ledger.ledger).where(ledger.ledger.c.bank_id == bank_id, ledger.ledger.c.channel == "AUTO_DEBIT"))}
        answers = {r.seq: r for r in conn.execute(
            sa.select(autodebit.results_table).where(autodebit.results_table.c.bank_id == bank_id))}
        c.bank_debits = len(debits)
        c.bank_debit_fen = sum(r.amount_fen for r in debits.values())
        c.bank_insufficient = sum(1 for r in answers.values() if r.outcome == autodebit.INSUFFICIENT_FUNDS)
        broken = ledger.check_passbooks(conn, bank_id)
    if broken:
        c.problems.append(f"{broken} passbooks do not balance")
    if c.cursor != c.fed:
        c.problems.append(f"cursor {c.cursor} != {c.fed} notices")
    if set(auto) != set(debits):
        c.problems.append(f"{len(set(auto) ^ set(debits))} debits on one side only")
    for seq, n in fed.items():
        r = results.get(seq)  # type: ignore[assignment]
        a = answers.get(seq)
        if r is None or a is None:
            c.problems.append(f"seq {seq}: no result (mis={r is not None} bank={a is not None})")
            continue
        if (r.outcome, r.bank_serial) != (a.outcome, a.bank_serial):
            c.problems.append(f"seq {seq}: results differ")
        if r.outcome == autodebit.DEBITED:
            p, d = auto.get(r.bank_serial), debits.get(r.bank_serial)
            if p is None or d is None or (p.account_no, p.amount_fen) != (d.account_no, d.amount_fen) \
                    or p.amount_fen != n.amount_fen or p.account_no != n.account_no:
                c.problems.append(f"seq {seq}: payment and debit do not match")
                continue
            if status[n.bill_id][0] != "PAID" or allocs.get(n.bill_id) != [p.payment_id]:
                c.problems.append(f"seq {seq}: bill {n.bill_id} not paid by exactly its debit")
            c.paid_by_debit += 1
            c.paid_fen += p.amount_fen
        else:
            if status[n.bill_id] != ("UNPAID", True):
                c.problems.append(f"seq {seq}: bill {n.bill_id} not in arrears for dunning")
            c.dunning += 1
    if c.paid_by_debit != c.bank_debits or c.paid_fen != c.bank_debit_fen or c.dunning != c.bank_insufficient:
        c.problems.append("counts or fen differ between the utility and the bank")
    return c


# ---- the benchmark ----

BENCH_BANK = "ICBC"
PROBE_BANK = "PROBE"
PROBE_FIRST_SERIAL = 9_000_000


class BenchFeedSettings(YinDianSettings):
    """`python -m bank_sim bench-feed` (`make bench-feed`)."""

    work_dir: str = Field("var/bench-feed", description="work directory, emptied at the start of each run")
    bills: int = Field(100_000, description="bills issued and fed per back end")
    backends: str = Field("sqlite,postgresql", description="comma-separated back ends to measure")
    pg_admin_url: str = Field("postgresql://postgres@127.0.0.1:5432/postgres",
                              description="PostgreSQL server to create the benchmark databases on")
    window: int = Field(20_000, description="mis_adapter --feed-window-max")
    notice_batch: int = Field(2_500, description="mis_adapter --feed-notice-batch-max")
    issue_batch: int = Field(5_000, description="accounts issued per transaction")
    probes: int = Field(200, description="single-bill issues timed from commit to notice")
    ready_timeout_s: float = Field(90.0, description="longest wait for a server's READY line")
    run_timeout_s: float = Field(900.0, description="longest a back end's run may take")
    keep_databases: bool = Field(False, description="PostgreSQL: keep the yd_bench_feed_* databases for a look "
                                                    "afterwards (dropped by default)")
    reference: bool = Field(True, description="on PostgreSQL, also measure the same-run reference: the same "
                                              "bills bulk-written at 5 durable rows each (unnest, 500 per tx)")


def _instant(v: object) -> float:
    if isinstance(v, str):  # SQLite hands back its UTC storage string
        v = dt.datetime.fromisoformat(v)
    assert isinstance(v, dt.datetime)
    return (v if v.tzinfo else v.replace(tzinfo=dt.UTC)).timestamp()


def _span(engine: Engine, q: sa.Select) -> float:  # type: ignore[type-arg]
    with engine.connect() as conn:
        v = conn.execute(q).scalar_one()
    return _instant(v) if v is not None else float("nan")


def _bench_data(action: str, mis_url: str, *extra: str) -> list[str]:
    """argv of `python -m mis_adapter bench-data ACTION` on the MIS database."""
    return [sys.executable, "-m", "mis_adapter", "bench-data", action, "--db", mis_url, "--period", BENCH_PERIOD,
            *extra]


def _probe_latency(mis_url: str, adapter_addr: str, n: int, work: Path, timeout_s: float) -> list[float]:
    """`mis_adapter bench-data probe` issues n single-bill transactions for the
    probe bank, one per line we send it; each is timed from the instant just
    before its commit (CLOCK_MONOTONIC, shared by the processes of this
    machine) to its notice arriving on our subscription of the probe bank."""
    import queue as _queue
    import threading

    import grpc

    from yindian.v1 import billing_pb2 as pb
    from yindian.v1 import billing_pb2_grpc

    repo = Path(__file__).resolve().parents[1]
    log = open(work / "probe.log", "a")  # noqa: SIM115 - handed to the child
    issuer = subprocess.Popen(_bench_data("probe", mis_url, "--bank", PROBE_BANK, "--count", str(n),
                                          "--first-serial", str(PROBE_FIRST_SERIAL)),
                              cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    assert issuer.stdin is not None and issuer.stdout is not None
    arrived: _queue.Queue[float] = _queue.Queue()
    requests: _queue.Queue[pb.BillFeedRequest | None] = _queue.Queue()
    requests.put(pb.BillFeedRequest(subscribe=pb.Subscribe()))
    channel = grpc.insecure_channel(adapter_addr)
    out: list[float] = []
    try:
        if "ready" not in json.loads(issuer.stdout.readline() or "{}"):  # the probe bank exists from here on
            raise RuntimeError(f"bench-data probe did not start; see {work / 'probe.log'}")
        call = billing_pb2_grpc.BillingServiceStub(channel).BillFeed(
            iter(requests.get, None), metadata=[("x-yindian-bank-id", PROBE_BANK)], timeout=timeout_s)

        def read() -> None:
            try:
                for msg in call:
                    if msg.WhichOneof("body") == "notices":
                        now = time.monotonic()
                        for _notice in msg.notices.notices:
                            arrived.put(now)
                        requests.put(pb.BillFeedRequest(results=pb.DebitResultBatch(results=[
                            pb.DebitResult(seq=x.seq, outcome=pb.DEBIT_OUTCOME_INSUFFICIENT_FUNDS)
                            for x in msg.notices.notices])))
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
        for _ in range(n):
            issuer.stdin.write("next\n")
            issuer.stdin.flush()
            committing = json.loads(issuer.stdout.readline())["committing_monotonic"]
            out.append(arrived.get(timeout=30) - committing)
        call.cancel()
    finally:
        requests.put(None)
        issuer.stdin.close()
        if issuer.wait(timeout=60) != 0:
            raise RuntimeError(f"bench-data probe failed; see {work / 'probe.log'}")
        channel.close()
        log.close()
    return out


BENCH_PERIOD = "202611"


def _run_backend(s: BenchFeedSettings, backend: str, work: Path) -> dict[str, float]:
    if backend == "sqlite":
        return _run_urls(s, f"sqlite:///{work / 'mis.db'}", f"sqlite:///{work / 'bank.db'}", work)
    tag = f"{int(time.time())}_{os.getpid()}"
    names = [f"yd_bench_feed_mis_{tag}", f"yd_bench_feed_bank_{tag}"]
    try:
        mis_url, bank_url = (create_database(s.pg_admin_url, n) for n in names)
        return _run_urls(s, mis_url, bank_url, work)
    finally:
        if not s.keep_databases:  # scratch databases: a month of bills each
            for n in names:
                drop_database(s.pg_admin_url, n)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    """CPU seconds of the children waited for so far (the issuer and the bank's consumer)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


BACKEND_SAMPLE_S = 0.2   # how often the database backends' CPU is read (a backend's last < 0.2 s can be missed)


class _BackendCpu:
    """CPU seconds the PostgreSQL backends of the given databases use while it
    runs (this machine's server only): every BACKEND_SAMPLE_S it lists their
    pids (pg_stat_activity) and reads each one's CPU from /proc, keeping each
    pid's first and last reading. A backend that ends loses at most its last
    interval; one that is gone from /proc is skipped."""

    def __init__(self, admin_url: str, databases: Sequence[str]) -> None:
        import threading
        self._url = "postgresql://" + admin_url.split("://", 1)[1]   # libpq's form of the SQLAlchemy URL
        self._dbs = list(databases)
        self._first: dict[int, tuple[str, float]] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backend-cpu", daemon=True)

    def _sample(self, conn: Any, started: bool) -> None:
        for pid, db in conn.execute("SELECT pid, datname FROM pg_stat_activity WHERE datname = ANY(%s)",
                                    (self._dbs,)).fetchall():
            try:
                cpu = _cpu_s(pid)
            except OSError:
                continue
            if pid not in self._first:
                self._first[pid] = (db, cpu if not started else 0.0)
            self._last[pid] = cpu

    def _run(self) -> None:
        import psycopg
        with psycopg.connect(self._url, autocommit=True) as conn:
            self._sample(conn, False)
            while not self._stop.wait(BACKEND_SAMPLE_S):
                self._sample(conn, True)
            self._sample(conn, True)

    def __enter__(self) -> _BackendCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def seconds(self, database: str) -> float:
        return sum(self._last[p] - cpu for p, (db, cpu) in self._first.items() if db == database)


def _run_urls(s: BenchFeedSettings, mis_url: str, bank_url: str, work: Path) -> dict[str, float]:
    bridge_url = f"sqlite:///{work / 'bridge.db'}"
    clock = SystemClock()
    repo = Path(__file__).resolve().parents[1]
    run_command("bench-data populate", _bench_data("populate", mis_url, "--accounts", str(s.bills),
                                                   "--banks", BENCH_BANK)[2:],
                log_dir=work, timeout_s=s.run_timeout_s, cwd=repo)
    mis, bank = make_engine(mis_url), make_engine(bank_url)
    open_passbooks(bank, BENCH_BANK, bench_accounts(s.bills), now=clock.now())
    servers = []
    try:
        adapter = start_server("mis_adapter", ["mis_adapter", "serve", "--db", mis_url, "--listen", "127.0.0.1:0",
                                               "--metrics-port", "0", "--insecure", "--feed-window-max",
                                               str(s.window), "--feed-notice-batch-max", str(s.notice_batch),
                                               "--feed-heartbeat-s", "0.5"],
                               log_dir=work, ready_timeout_s=s.ready_timeout_s, cwd=repo)
        servers.append(adapter)
        bridge = start_server("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream",
                                         adapter.grpc_addr, "--db", bridge_url, "--bank-id", BENCH_BANK,
                                         "--metrics-port", "0", "--insecure"],
                              log_dir=work, ready_timeout_s=s.ready_timeout_s, cwd=repo)
        servers.append(bridge)
        log = open(work / "autodebit.log", "a")  # noqa: SIM115 - handed to the child
        consumer = subprocess.Popen(
            [sys.executable, "-m", "bank_sim", "autodebit", "--target", bridge.grpc_addr, "--db", bank_url,
             "--bank-id", BENCH_BANK, "--insecure", "--idle-exit-s", "1.5", "--idle-exit-after-seq", str(s.bills),
             "--run-timeout-s", str(s.run_timeout_s)], cwd=repo, stdout=log, stderr=subprocess.STDOUT)
        # Issuance is timed inside the issuing process (its start-up is not issuance).
        cpu0 = _children_cpu_s()
        mis_db, bank_db = (sa.make_url(u).database or "" for u in (mis_url, bank_url))
        sampler = (_BackendCpu(s.pg_admin_url, [mis_db, bank_db]) if mis_url.startswith("postgresql")
                   else contextlib.nullcontext())
        sampler.__enter__()
        issued = subprocess.run(_bench_data("issue", mis_url, "--batch-accounts", str(s.issue_batch)), cwd=repo,
                                capture_output=True, text=True, timeout=s.run_timeout_s)
        if issued.returncode != 0:
            raise RuntimeError(f"bench-data issue failed: {issued.stderr[-2000:]}")
        timing = json.loads(issued.stdout.strip().splitlines()[-1])
        issued_s, wall0 = float(timing["issued_s"]), float(timing["started_wall"])
        cpu_issue = _children_cpu_s() - cpu0
        if consumer.wait(timeout=s.run_timeout_s) != 0:
            raise RuntimeError(f"autodebit failed; see {work / 'autodebit.log'}")
        cpu_bank = _children_cpu_s() - cpu0 - cpu_issue
        sampler.__exit__(None, None, None)
        db_cpu = ((sampler.seconds(mis_db), sampler.seconds(bank_db)) if isinstance(sampler, _BackendCpu)
                  else (float("nan"), float("nan")))
        cpu_adapter, cpu_bridge = _cpu_s(adapter.popen.pid), _cpu_s(bridge.popen.pid)
        res, pay, led = autodebit.results_table, mis_tables.payments, ledger.ledger
        delivered = _span(bank, sa.select(sa.func.max(res.c.processed_at)))
        debited = _span(bank, sa.select(sa.func.max(led.c.created_at)).where(led.c.channel == "AUTO_DEBIT"))
        acked = _span(mis, sa.select(sa.func.max(mis_tables.feed_results.c.received_at)))
        posted = _span(mis, sa.select(sa.func.max(pay.c.posted_at)).where(pay.c.channel == "AUTO_DEBIT"))
        check = check_feed(mis, bank, BENCH_BANK, BENCH_PERIOD)
        if check.problems:
            raise RuntimeError(f"feed invariants broken: {check.problems[:5]}")
        lat = (sorted(_probe_latency(mis_url, adapter.grpc_addr, s.probes, work, s.run_timeout_s)) if s.probes
               else [float("nan")])
    finally:
        for proc in reversed(servers):
            proc.stop(30)
        mis.dispose()
        bank.dispose()
    n = s.bills
    return {"issued": n / issued_s, "delivered": n / (delivered - wall0), "debited": n / (debited - wall0),
            "acknowledged": n / (acked - wall0), "posted": n / (posted - wall0),
            "paid": check.paid_by_debit, "dunning": check.dunning,
            "cpu_issue_us": 1e6 * cpu_issue / n, "cpu_adapter_us": 1e6 * cpu_adapter / n,
            "cpu_bridge_us": 1e6 * cpu_bridge / n, "cpu_bank_us": 1e6 * cpu_bank / n,
            "cpu_mis_db_us": 1e6 * db_cpu[0] / n, "cpu_bank_db_us": 1e6 * db_cpu[1] / n,
            "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim bench-feed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_flags(parser, BenchFeedSettings)
    args = parser.parse_args(argv)
    s = load_settings(BenchFeedSettings, args, args.config_file)
    root = Path(s.work_dir)
    if root.exists():
        shutil.rmtree(root)
    print(f"bench-feed: {s.bills:,} bills per back end, window {s.window}, {s.notice_batch} notices per message; "
          "rates are bills/s from the start of issuance to the stage's last bill (stages overlap)")
    print(f"{'backend':<11}{'issued':>10}{'delivered':>11}{'debited':>10}{'acked':>10}{'posted':>10}"
          f"{'paid':>9}{'arrears':>9}{'notice p50 ms':>15}{'p99 ms':>9}")
    for backend in [b.strip() for b in s.backends.split(",") if b.strip()]:
        work = root / backend
        work.mkdir(parents=True)
        r = _run_backend(s, backend, work)
        print(f"{backend:<11}{r['issued']:>10,.0f}{r['delivered']:>11,.0f}{r['debited']:>10,.0f}"
              f"{r['acknowledged']:>10,.0f}{r['posted']:>10,.0f}{r['paid']:>9,.0f}{r['dunning']:>9,.0f}"
              f"{r['p50_ms']:>15.1f}{r['p99_ms']:>9.1f}  load {_load()}", flush=True)
        print(f"{'  CPU':<11}µs per bill: issuer {r['cpu_issue_us']:,.0f}, mis_adapter {r['cpu_adapter_us']:,.0f} "
              f"(with its start-up), bridge {r['cpu_bridge_us']:,.0f}, bank auto-debit {r['cpu_bank_us']:,.0f}"
              + (f"; PostgreSQL backends: MIS {r['cpu_mis_db_us']:,.0f}, bank {r['cpu_bank_db_us']:,.0f} "
                 f"(sampled every {BACKEND_SAMPLE_S} s)" if backend == "postgresql" else ""), flush=True)
        if backend == "postgresql" and s.reference:
            ref = bulk_write_bills_per_s(s.pg_admin_url, s.bills)
            print(f"{'  reference':<11}{'':>10}{'':>11}{'':>10}{'':>10}{ref:>10,.0f}  bulk write of the same bills, "
                  f"5 durable rows each, unnest, {REFERENCE_BATCH_BILLS} per tx, 1 connection: "
                  f"posted/reference = {r['posted'] / ref:.2f}  load {_load()}", flush=True)
    return 0
