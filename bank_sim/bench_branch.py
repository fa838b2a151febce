"""`make bench-branch`: the branch topology against one database, in the same run.

For each topology on PostgreSQL (fresh databases on --pg-admin-url, dropped
afterwards):
- single: one MIS database, one mis_adapter;
- branch: a front database and 4 branch databases (the primary for branches
  01 and 05-08, and 02, 03, 04 each its own), two mis_adapter replicas
  behind the bridge (`--upstream A --upstream B`; calls go to one, the other
  stands by).
It seeds the same households, measures counter pays through the bridge at
each --levels (closed loop, bank_sim.bench_core's driver), then makes
--feed-bills bills spread over the databases (`mis_adapter bench-data
populate` and `issue` in each) and times the bank's feed through the bridge:
subscribe, answer every notice (DEBITED), until the cursor covers the last
seq: bills/s. Prints both with the load average
(this box is shared: compare figures of one run only).

Speaks to the MIS only through its CLI and the wire."""
from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from pydantic import Field
from rich.console import Console
from rich.table import Table

from bank_sim import ledger
from bank_sim.bench_core import measure
from bank_sim.processes import ProcessFailed, ServerProcess, run_command, start_server
from bank_sim.settings import BenchCoreSettings
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import create_database, drop_database
from yindian_common.settings import YinDianSettings, add_settings_flags, load_settings

REPO = Path(__file__).resolve().parents[1]
BRANCHES_OWN_DB = ("02", "03", "04")   # with the primary: 4 branch databases
FEED_MESSAGES_MAX = 1_000_000          # stream messages read before giving up
FEED_IDLE_END_S = 2.0                  # the feed is over when nothing new came this long after the last ack
FEED_FIRST_SERIAL = 5_000_000          # account serials of the feed's households (clear of the seed's)


class BenchBranchSettings(YinDianSettings):
    work_dir: str = Field("var/bench-branch", description="work directory, emptied at the start of each run")
    accounts: int = Field(5000, description="households the utility is seeded with")
    bank_id: str = Field("ICBC", description="the paying bank")
    levels: str = Field("8,32", description="comma-separated numbers of pays in flight")
    level_duration_s: float = Field(10.0, description="how long each concurrency level runs")
    warmup_s: float = Field(1.0, description="unmeasured warm-up before each level")
    pg_admin_url: str = Field("postgresql://postgres@127.0.0.1:5432/postgres",
                              description="PostgreSQL server on which fresh databases are created")
    clock_start: str = Field("2026-11-28T09:00:00+08:00", description="the business clock of every process")
    feed_bills: int = Field(20_000, description="bills issued for the feed, spread evenly over the databases")
    feed_period: str = Field("202612", description="the period of the feed's bills (households made for it)")
    feed_timeout_s: float = Field(300.0, description="longest the feed may take to be acknowledged")
    ready_timeout_s: float = Field(60.0, description="longest wait for a server's READY line")
    stop_timeout_s: float = Field(30.0, description="longest wait for a server to exit after SIGTERM")
    json_file: str = Field("", description="also write the results as JSON to this file")


@dataclass
class TopologyResult:
    topology: str
    pays_per_s: dict[int, float] = field(default_factory=dict)
    p99_ms: dict[int, float] = field(default_factory=dict)
    bills: int = 0
    bills_per_s: float = 0.0
    issue_s: float = 0.0


def consume_feed(target: str, bank_id: str, timeout_s: float) -> tuple[int, float]:
    """Answers every notice DEBITED until a heartbeat's cursor covers the last one; (bills, seconds)."""
    q: queue.Queue[pb.BillFeedRequest | None] = queue.Queue()
    q.put(pb.BillFeedRequest(subscribe=pb.Subscribe()))
    high = 0
    started = time.perf_counter()
    last_notice = acked_at = started
    with grpc.insecure_channel(target) as ch:
        call = billing_pb2_grpc.BillingServiceStub(ch).BillFeed(
            iter(q.get, None), metadata=[("x-yindian-bank-id", bank_id)], timeout=timeout_s)
        try:
            for _ in range(FEED_MESSAGES_MAX):
                msg = next(call)
                now = time.perf_counter()
                if msg.WhichOneof("body") == "notices":
                    ns = msg.notices.notices
                    high = max(high, ns[-1].seq)
                    last_notice = now
                    q.put(pb.BillFeedRequest(results=pb.DebitResultBatch(results=[
                        pb.DebitResult(seq=n.seq, outcome=pb.DEBIT_OUTCOME_DEBITED, bank_serial=f"BD-{n.seq}",
                                       amount_fen=n.amount_fen) for n in ns])))
                elif high and msg.heartbeat.acked_through_seq >= high:
                    if acked_at < last_notice:  # the first acknowledgement of everything sent so far
                        acked_at = now
                    if now - last_notice > FEED_IDLE_END_S:  # nothing new since the cursor caught up: done
                        return high, acked_at - started
        finally:
            q.put(None)
            call.cancel()
    raise RuntimeError("the feed never finished")


def run_topology(name: str, s: BenchBranchSettings, root: Path, console: Console) -> TopologyResult | None:
    work = root / name
    work.mkdir(parents=True)
    tag = secrets.token_hex(3)
    labels = ["mis"] + ([f"b{c}" for c in BRANCHES_OWN_DB] + ["front"] if name == "branch" else []) + ["bridge"]
    urls = {label: create_database(s.pg_admin_url, f"yd_bb_{label}_{tag}") for label in labels}
    branch_flags = [f for c in BRANCHES_OWN_DB for f in ("--branch-db", f"{c}={urls[f'b{c}']}")] \
        if name == "branch" else []
    front_flags = ["--front-db", urls["front"]] if name == "branch" else []
    clock = ["--clock-start", s.clock_start]
    servers: list[ServerProcess] = []
    result = TopologyResult(name)
    try:
        run_command("seed", ["mis_adapter", "seed", "--db", urls["mis"], *branch_flags, "--accounts",
                             str(s.accounts), "--roster-dir", str(work / "rosters"), *clock],
                    log_dir=work, timeout_s=900, cwd=REPO)
        replicas = ["mis_adapter-a", "mis_adapter-b"] if name == "branch" else ["mis_adapter"]
        for r in replicas:
            servers.append(start_server(r, ["mis_adapter", "serve", "--db", urls["mis"], *branch_flags, *front_flags,
                                            "--listen", "127.0.0.1:0", "--metrics-port", "0", "--insecure", *clock],
                                        log_dir=work, ready_timeout_s=s.ready_timeout_s, cwd=REPO))
        bridge = start_server("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0",
                                         *(f for p in servers for f in ("--upstream", p.grpc_addr)),
                                         "--db", urls["bridge"], "--bank-id", s.bank_id, "--metrics-port", "0",
                                         "--insecure", *clock],
                              log_dir=work, ready_timeout_s=s.ready_timeout_s, cwd=REPO)
        servers.append(bridge)
        accounts = ledger.read_roster(work / "rosters" / f"{s.bank_id}.csv")
        core = load_settings(BenchCoreSettings, {"levels": s.levels, "level_duration_s": s.level_duration_s,
                                                 "warmup_s": s.warmup_s})
        console.print(f"[bold]{name}[/bold]: {s.accounts:,} households over {1 + len(branch_flags) // 2} "
                      f"database(s), {len(replicas)} mis_adapter replica(s)")
        for level in measure(name, "bridge", bridge.grpc_addr, s.bank_id, accounts, core, console,
                             {"bridge": bridge.popen.pid, "mis_adapter": servers[0].popen.pid}):
            result.pays_per_s[level.in_flight] = level.pays_per_s
            result.p99_ms[level.in_flight] = level.p99_ms
        # The feed's bills: households made for it in every database (its branch code), then issued there.
        dbs = [("01", urls["mis"])] + ([(c, urls[f"b{c}"]) for c in BRANCHES_OWN_DB] if name == "branch" else [])
        per_db = max(1, s.feed_bills // len(dbs))
        t0 = time.perf_counter()
        for code, db in dbs:
            for action in ("populate", "issue"):
                run_command(f"bench-data-{action}", ["mis_adapter", "bench-data", action, "--db", db, "--period",
                                                     s.feed_period, "--accounts", str(per_db), "--branch", code,
                                                     "--first-serial", str(FEED_FIRST_SERIAL), "--banks",
                                                     s.bank_id], log_dir=work, timeout_s=900, cwd=REPO)
        result.issue_s = time.perf_counter() - t0
        result.bills, feed_s = consume_feed(bridge.grpc_addr, s.bank_id, s.feed_timeout_s)
        result.bills_per_s = round(result.bills / feed_s, 1) if feed_s > 0 else 0.0
        console.print(f"  {name:<7} feed: {result.bills:,} bills in {feed_s:.1f} s = {result.bills_per_s:,.0f} "
                      f"bills/s (issuing took {result.issue_s:.1f} s)")
        return result
    except (ProcessFailed, RuntimeError) as exc:
        console.print(f"[red]{name}: {exc}[/red]")
        return None
    finally:
        for proc in reversed(servers):
            try:
                proc.stop(s.stop_timeout_s)
            except ProcessFailed as exc:
                console.print(f"[red]{exc}[/red]")
        for url in urls.values():
            drop_database(s.pg_admin_url, url.rsplit("/", 1)[1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim bench-branch", description=__doc__.splitlines()[0])
    add_settings_flags(parser, BenchBranchSettings)
    args = parser.parse_args(argv)
    s = load_settings(BenchBranchSettings, args, args.config_file)
    console = Console(width=max(Console().width, 120))
    root = Path(s.work_dir) if Path(s.work_dir).is_absolute() else REPO / s.work_dir
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    results = [r for r in (run_topology(t, s, root, console) for t in ("single", "branch")) if r is not None]
    load = os.getloadavg()
    table = Table(title=f"Branch topology vs one database, PostgreSQL (load average {load[0]:.1f} "
                        f"{load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores)")
    table.add_column("topology")
    for level in (int(x) for x in s.levels.split(",") if x.strip()):
        table.add_column(f"pays/s @{level}", justify="right")
        table.add_column(f"p99 ms @{level}", justify="right")
    table.add_column("feed bills/s", justify="right")
    for r in results:
        cells = [c for lv in r.pays_per_s for c in (f"{r.pays_per_s[lv]:,.1f}", f"{r.p99_ms[lv]:,.1f}")]
        table.add_row(r.topology, *cells, f"{r.bills_per_s:,.0f} ({r.bills:,} bills)")
    console.print(table)
    if s.json_file:
        Path(s.json_file).write_text(json.dumps({"load_average": load, "results": [asdict(r) for r in results]},
                                                indent=2), encoding="utf-8")
    return 0 if len(results) == 2 else 1
