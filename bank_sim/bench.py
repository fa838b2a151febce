"""`make bench` (`python -m bank_sim bench`): the standard load profile
through bridge -> mis_adapter, on SQLite and on PostgreSQL, at stepped
offered rates; one comparable summary per back end with the highest rate
sustained with p99 under the bound, and the machine's load average.

Each back end gets a fresh database (PostgreSQL: created on the configured
server, dropped afterwards; skipped with the reason printed when the server
is unreachable), a seeded utility, and real processes on loopback. Each step
is one open-loop `bank_sim load` run (bank_sim.load.run_load_async) with its
correctness check against the MIS database, so a rate only counts as
sustained when the money also agrees. Stepping stops after
`unsustained_steps_max` steps in a row fail. Never kills a process it did not start."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import Field
from rich.console import Console
from rich.table import Table

from bank_sim.ledger import read_roster
from bank_sim.load import LoadProfile, LoadResult, run_load_async
from bank_sim.processes import ProcessFailed, ServerProcess, seed_and_start_stack
from yindian_common.db import create_database, drop_database
from yindian_common.settings import YinDianSettings, add_settings_flags, load_settings

REPO = Path(__file__).resolve().parents[1]
DESCRIPTION = "Benchmark: the standard load profile through bridge -> mis_adapter, SQLite and PostgreSQL, stepped rates."
CONSOLE_WIDTH_MIN = 200
RATES_MAX = 32


class BenchSettings(YinDianSettings):
    """`python -m bank_sim bench` (`make bench`)."""

    work_dir: str = Field("var/bench", description="work directory, emptied at the start of each run")
    accounts: int = Field(5000, ge=1, description="households the utility is seeded with")
    bank_id: str = Field("ICBC", description="the bank whose load is offered")
    rates: str = Field("100,200,400,800,1200,1600", description="comma-separated offered rates (calls/s), in order")
    step_duration_s: float = Field(10.0, gt=0, description="measured seconds of each step")
    warmup_s: float = Field(2.0, ge=0, description="unmeasured warm-up before each step")
    concurrency: int = Field(256, ge=1, description="calls in flight at most (an arrival finding none free is dropped)")
    mix: str = Field("query=50,pay=35,cancel=5,autodebit=10", description="the standard profile's operation shares")
    p99_max_ms: float = Field(50.0, gt=0, description="a rate is sustained when p99 stays under this (and nothing drops)")
    unsustained_steps_max: int = Field(2, ge=1, description="stop stepping after this many unsustained steps in a row")
    backends: str = Field("sqlite,postgresql", description="comma-separated back ends to measure")
    pg_admin_url: str = Field("postgresql://postgres@127.0.0.1:5432/postgres",
                              description="PostgreSQL server to create the benchmark databases on")
    rpc_deadline_s: float = Field(5.0, gt=0, description="deadline of every call")
    seed_timeout_s: float = Field(600.0, gt=0, description="longest the seeding may run")
    ready_timeout_s: float = Field(60.0, gt=0, description="longest wait for a server's READY line")
    stop_timeout_s: float = Field(30.0, gt=0, description="longest wait for a server to exit after SIGTERM")


@dataclass
class Step:
    backend: str
    result: LoadResult
    sustained: bool
    # CPU per answered call (warm-up included) of each process, from /proc: the cost-model figure
    # that a busy shared machine distorts least (PostgreSQL's own processes not included). At low
    # rates every call pays gRPC's thread wake-ups (the aio client alone measured ~1.3 ms per call at
    # 100 calls/s against ~0.44 ms at 1,000/s), so the ceiling from a quiet step is a floor, not an estimate.
    cpu_us_per_call: dict[str, float] = field(default_factory=dict)

    @property
    def ceiling_per_s(self) -> float | None:
        """What this box could carry at 100 % CPU by the cost model: cores / CPU per call."""
        total_us = sum(self.cpu_us_per_call.values())
        return (os.cpu_count() or 1) * 1e6 / total_us if total_us > 0 else None

    def to_json(self) -> dict[str, Any]:
        out = self.result.to_json()
        out.pop("histogram", None)
        return {"backend": self.backend, "sustained": self.sustained, "cpu_us_per_call": self.cpu_us_per_call,
                "ceiling_per_s": self.ceiling_per_s, "result": out}


@dataclass
class Backend:
    name: str
    mis_db: str
    bridge_db: str
    dropped_dbs: list[str] = field(default_factory=list)
    skipped: str = ""


def parse_rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or len(rates) > RATES_MAX or any(r <= 0 for r in rates):
        raise ValueError(f"rates: 1 to {RATES_MAX} positive numbers, comma-separated")
    return rates


def make_backend(name: str, work: Path, settings: BenchSettings) -> Backend:
    if name == "sqlite":
        return Backend(name, f"sqlite:///{work / 'mis.db'}", f"sqlite:///{work / 'bridge.db'}")
    if name != "postgresql":
        raise ValueError(f"unknown back end {name!r} (sqlite, postgresql)")
    tag = secrets.token_hex(3)
    mis_name, bridge_name = f"yd_bench_mis_{tag}", f"yd_bench_bridge_{tag}"
    try:
        mis_db = create_database(settings.pg_admin_url, mis_name)
    except sa.exc.OperationalError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        return Backend(name, "", "", skipped=f"PostgreSQL unreachable at {settings.pg_admin_url} ({first})")
    bridge_db = create_database(settings.pg_admin_url, bridge_name)
    return Backend(name, mis_db, bridge_db, [mis_name, bridge_name])


def step_profile(settings: BenchSettings, target: str, mis_db: str, rate_per_s: float) -> LoadProfile:
    return load_settings(LoadProfile, dict(target=target, bank_id=settings.bank_id, insecure=True, rate_per_s=rate_per_s,
                       duration_s=settings.step_duration_s, warmup_s=settings.warmup_s,
                                       concurrency=settings.concurrency, mix=settings.mix, mis_db=[mis_db],
                                       progress=False, rpc_deadline_s=settings.rpc_deadline_s))


def run_steps(backend: Backend, target: str, accounts: list[str], servers: dict[str, int], settings: BenchSettings,
              console: Console) -> list[Step]:
    steps: list[Step] = []
    failed_in_a_row = 0
    for rate in parse_rates(settings.rates):
        profile = step_profile(settings, target, backend.mis_db, rate)
        cpu_before = {name: process_cpu_s(pid) for name, pid in servers.items()}
        result, _ledger = asyncio.run(run_load_async(profile, accounts))
        ok_money = result.check is not None and result.check.ok
        sustained = result.sustained(settings.p99_max_ms) and ok_money
        steps.append(Step(backend.name, result, sustained, cpu_per_call(result, servers, cpu_before)))
        console.print(step_line(steps[-1]), highlight=False, soft_wrap=True)
        failed_in_a_row = 0 if sustained else failed_in_a_row + 1
        if failed_in_a_row >= settings.unsustained_steps_max:
            console.print(f"  {backend.name}: {failed_in_a_row} steps in a row not sustained; stepping stops")
            break
    return steps


def process_cpu_s(pid: int) -> float | None:
    """User+system CPU seconds of a process from Linux /proc (None elsewhere or once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_call(result: LoadResult, servers: dict[str, int], cpu_before: dict[str, float | None]
                 ) -> dict[str, float]:
    calls = max(1, result.calls_total)
    out = {"generator": round(result.generator_cpu_s / calls * 1e6, 1)}
    for name, pid in servers.items():
        before, after = cpu_before[name], process_cpu_s(pid)
        if before is not None and after is not None:
            out[name] = round((after - before) / calls * 1e6, 1)
    return out


def step_line(s: Step) -> str:
    r = s.result
    check = "money OK" if r.check is not None and r.check.ok else (
        f"money FAILED ({r.check.discrepancy_count})" if r.check is not None else "no check")
    return (f"  {s.backend:<10} offered {r.offered_rate_per_s:>7,.0f}/s  achieved {r.rate_per_s:>8,.1f}/s  "
            f"dropped {r.dropped:>6,}  p50 {r.latency.p50_ms:8.2f}  p99 {r.latency.p99_ms:9.2f}  "
            f"p99.9 {r.latency.p999_ms:9.2f} ms  {check}  {'sustained' if s.sustained else 'NOT sustained'}  "
            f"load {r.load_average[0]:.2f}  CPU us/call {_cpu(s)}")


def _cpu(s: Step) -> str:
    return " ".join(f"{k} {v:,.0f}" for k, v in s.cpu_us_per_call.items())


def bench_backend(name: str, settings: BenchSettings, root: Path, console: Console) -> tuple[list[Step], str]:
    """Steps for one back end, or an empty list and the reason it was skipped."""
    work = root / name
    work.mkdir(parents=True)
    backend = make_backend(name, work, settings)
    if backend.skipped:
        console.print(f"[yellow]skipping {name}: {backend.skipped}[/yellow]")
        return [], backend.skipped
    servers: list[ServerProcess] = []
    try:
        roster, mis, bridge = seed_and_start_stack(
            work, mis_db=backend.mis_db, bridge_db=backend.bridge_db, accounts=settings.accounts,
            bank_id=settings.bank_id, ready_timeout_s=settings.ready_timeout_s, seed_timeout_s=settings.seed_timeout_s,
            cwd=REPO, servers=servers)
        accounts = read_roster(roster)
        console.print(f"[bold]{name}[/bold]: {settings.accounts:,} households, {len(accounts):,} accounts on "
                      f"{settings.bank_id}'s roster; bridge {bridge.grpc_addr} -> mis_adapter {mis.grpc_addr}")
        pids = {"bridge": bridge.popen.pid, "mis_adapter": mis.popen.pid}
        return run_steps(backend, bridge.grpc_addr, accounts, pids, settings, console), ""
    finally:
        for proc in reversed(servers):
            try:
                proc.stop(settings.stop_timeout_s)
            except ProcessFailed as exc:
                console.print(f"[red]{exc}[/red]")
        for db_name in backend.dropped_dbs:
            drop_database(settings.pg_admin_url, db_name)


def backend_table(name: str, steps: list[Step], p99_max_ms: float) -> Table:
    table = Table(title=f"bench {name}: bank_sim load -> bridge -> mis_adapter (latency ms from intended send time)")
    for col in ("offered/s", "achieved/s", "dropped", "OK %", "p50", "p90", "p99", "p99.9", "slowest", "retries",
                "money", f"p99<{p99_max_ms:g}", "load 1m", "CPU us/call gen+bridge+mis", "ceiling/s"):
        table.add_column(col, justify="right")
    for s in steps:
        r = s.result
        ok_pct = 100.0 * r.ok / r.completed if r.completed else 0.0
        money = "-" if r.check is None else "OK" if r.check.ok else f"FAILED {r.check.discrepancy_count}"
        table.add_row(f"{r.offered_rate_per_s:,.0f}", f"{r.rate_per_s:,.1f}", f"{r.dropped:,}", f"{ok_pct:.2f}",
                      f"{r.latency.p50_ms:.2f}", f"{r.latency.p90_ms:.2f}", f"{r.latency.p99_ms:.2f}",
                      f"{r.latency.p999_ms:.2f}", f"{r.latency.slowest_ms:.2f}", f"{r.retries:,}", money,
                      "yes" if s.sustained else "no", f"{r.load_average[0]:.2f}",
                      "+".join(f"{v:,.0f}" for v in s.cpu_us_per_call.values()),
                      f"{s.ceiling_per_s:,.0f}" if s.ceiling_per_s else "-")
    return table


def summary_table(all_steps: dict[str, list[Step]], skipped: dict[str, str], settings: BenchSettings) -> Table:
    table = Table(title=f"bench summary: mix {settings.mix}, {settings.step_duration_s:g} s per step, "
                        f"concurrency {settings.concurrency}")
    for col in ("back end", f"highest sustained rate (p99<{settings.p99_max_ms:g} ms)", "p50 ms", "p99 ms",
                "load average at the time (1/5/15 min)", "CPU us/call gen+bridge+mis", "cost-model ceiling/s", "note"):
        table.add_column(col, justify="left" if col in ("back end", "note") else "right")
    for name, steps in all_steps.items():
        busiest = max(steps, key=lambda s: s.result.calls_total, default=None)  # most calls: steadiest CPU figures
        cpu = "+".join(f"{v:,.0f}" for v in busiest.cpu_us_per_call.values()) if busiest else "-"
        ceiling = f"{busiest.ceiling_per_s:,.0f}" if busiest and busiest.ceiling_per_s else "-"
        best = max((s for s in steps if s.sustained), key=lambda s: s.result.offered_rate_per_s, default=None)
        if best is None:
            last = steps[-1].result.load_average if steps else os.getloadavg()
            table.add_row(name, "none", "-", "-", " ".join(f"{x:.2f}" for x in last), cpu, ceiling,
                          "no step sustained")
            continue
        r = best.result
        table.add_row(name, f"{r.offered_rate_per_s:,.0f}/s (achieved {r.rate_per_s:,.1f}/s)",
                      f"{r.latency.p50_ms:.2f}", f"{r.latency.p99_ms:.2f}",
                      " ".join(f"{x:.2f}" for x in r.load_average), cpu, ceiling, "")
    for name, reason in skipped.items():
        table.add_row(name, "skipped", "-", "-", " ".join(f"{x:.2f}" for x in os.getloadavg()), "-", "-", reason)
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim bench", description=DESCRIPTION)
    add_settings_flags(parser, BenchSettings)
    parser.add_argument("--json", dest="json_out", default=None, help="also write every step's result as JSON here")
    args = parser.parse_args(argv)
    settings = load_settings(BenchSettings, args, args.config_file)
    parse_rates(settings.rates)
    console = Console(width=max(Console().width, CONSOLE_WIDTH_MIN))
    root = Path(settings.work_dir)
    root = root if root.is_absolute() else REPO / root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    console.print(f"rates {settings.rates}/s, {settings.step_duration_s:g} s each (+{settings.warmup_s:g} s warm-up), "
                  f"mix {settings.mix}, concurrency {settings.concurrency}; {os.cpu_count()} CPUs, load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; work dir {root}")
    all_steps: dict[str, list[Step]] = {}
    skipped: dict[str, str] = {}
    for name in (b.strip() for b in settings.backends.split(",") if b.strip()):
        steps, reason = bench_backend(name, settings, root, console)
        if reason:
            skipped[name] = reason
        else:
            all_steps[name] = steps
    for name, steps in all_steps.items():
        console.print(backend_table(name, steps, settings.p99_max_ms))
    console.print(summary_table(all_steps, skipped, settings))
    if args.json_out:
        doc = {"settings": settings.model_dump(), "skipped": skipped,
               "steps": [s.to_json() for steps in all_steps.values() for s in steps]}
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    failed_money = [s for steps in all_steps.values() for s in steps if s.result.check and not s.result.check.ok]
    return 1 if failed_money else 0
