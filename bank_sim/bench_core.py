"""`make bench-core`: counter payments through bridge -> mis_adapter, on SQLite
and on PostgreSQL, at increasing numbers of pays in flight, and the same pays
sent straight to mis_adapter for comparison. Prints pays/s and p50/p99
latency per level (hdrhistogram).

A closed-loop driver: at level N, N asyncio tasks on one grpc.aio channel
each send Pay after Pay (fresh serial, random roster account) for a bounded
time; only calls that start after the warm-up and finish inside the window
count. Real processes on loopback, fresh databases, nothing else touched.
PostgreSQL is skipped, with the reason printed, when its server is unreachable."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import sqlalchemy as sa
from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.table import Table

from bank_sim import ledger
from bank_sim.processes import ProcessFailed, ServerProcess, seed_and_start_stack
from bank_sim.settings import BenchCoreSettings
from yindian.v1 import billing_pb2, billing_pb2_grpc
from yindian_common.db import create_database, drop_database
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.server import channel_options
from yindian_common.settings import add_settings_flags, load_settings

REPO = Path(__file__).resolve().parents[1]
DESCRIPTION = "Benchmark: counter pays through bridge -> mis_adapter vs direct, on SQLite and PostgreSQL."
PAY_MIN_FEN = 1_000
PAY_MAX_FEN = 30_000
ERROR_KINDS_MAX = 16
BENCH_CONSOLE_WIDTH_MIN = 120  # one line per level even when piped


@dataclass
class LevelResult:
    backend: str
    path: str
    in_flight: int
    pays: int
    pays_per_s: float
    p50_ms: float
    p99_ms: float
    # CPU each server spent per completed call (warm-up included), from /proc: immune to a busy machine's noise
    server_cpu_us_per_pay: dict[str, int] = field(default_factory=dict)
    # the kernel's share of it (SQLite's fsync shows up here)
    server_sys_us_per_pay: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


def process_cpu_s(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    ticks = stat.rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return int(ticks[11]) / hz, int(ticks[12]) / hz


async def drive_level(target: str, bank_id: str, accounts: list[str], in_flight: int, settings: BenchCoreSettings,
                      serial_prefix: str) -> tuple[int, int, HdrHistogram, dict[str, int]]:
    """N tasks, Pay after Pay; returns (pays counted in the window, calls completed in all,
    latency histogram in µs, errors by code)."""
    max_us = settings.latency_max_ms * 1000
    hist = HdrHistogram(1, max_us, 3)
    errors: dict[str, int] = {}
    counted = 0
    completed = 0
    metadata = ((BANK_ID_METADATA, bank_id),)
    started = time.perf_counter()
    window_from = started + settings.warmup_s
    window_to = window_from + settings.level_duration_s
    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        stub = billing_pb2_grpc.BillingServiceStub(channel)

        async def worker(task: int) -> None:
            nonlocal counted, completed
            rng = random.Random(task)
            n = 0
            while (t0 := time.perf_counter()) < window_to:
                n += 1
                req = billing_pb2.PayRequest(
                    bank_serial=f"{serial_prefix}{task:03d}{n:07d}", account_no=rng.choice(accounts),
                    amount_fen=rng.randint(PAY_MIN_FEN, PAY_MAX_FEN), outlet_code="OUT001",
                    teller_id=f"TLR001{task % 100:02d}", channel=billing_pb2.CHANNEL_COUNTER)
                code = ""
                try:
                    await stub.Pay(req, timeout=settings.rpc_deadline_s, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                t1 = time.perf_counter()
                completed += 1
                if t0 < window_from or t1 > window_to:
                    continue
                if code:
                    if code in errors or len(errors) < ERROR_KINDS_MAX:
                        errors[code] = errors.get(code, 0) + 1
                    continue
                counted += 1
                hist.record_value(min(max(1, int((t1 - t0) * 1_000_000)), max_us))

        await asyncio.gather(*(worker(i) for i in range(in_flight)))
    return counted, completed, hist, errors


def measure(backend: str, path: str, target: str, bank_id: str, accounts: list[str],
            settings: BenchCoreSettings, console: Console, server_pids: dict[str, int]) -> list[LevelResult]:
    """Every level on one path; `server_pids` are the servers the pays cross (for their CPU per pay)."""
    results = []
    for level in (int(x) for x in settings.levels.split(",") if x.strip()):
        prefix = f"K{secrets.token_hex(3)}"
        cpu_before = {name: process_cpu_s(pid) for name, pid in server_pids.items()}
        pays, completed, hist, errors = asyncio.run(
            drive_level(target, bank_id, accounts, level, settings, prefix))
        cpu_us: dict[str, int] = {}
        sys_us: dict[str, int] = {}
        for name, pid in server_pids.items():
            before, after = cpu_before[name], process_cpu_s(pid)
            if before is not None and after is not None and completed:
                cpu_us[name] = int((sum(after) - sum(before)) * 1_000_000 / completed)
                sys_us[name] = int((after[1] - before[1]) * 1_000_000 / completed)
        r = LevelResult(backend, path, level, pays, round(pays / settings.level_duration_s, 1),
                        hist.get_value_at_percentile(50) / 1000, hist.get_value_at_percentile(99) / 1000,
                        cpu_us, sys_us, errors)
        cpu_text = " ".join(f"{k} {v:,} µs (sys {sys_us[k]:,})" for k, v in cpu_us.items())
        console.print(f"  {backend:<10} {path:<6} in flight {level:>3}: {r.pays_per_s:>8,.1f} pays/s  "
                      f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  CPU/pay {cpu_text}  errors {errors or '-'}")
        results.append(r)
    return results


@dataclass
class Backend:
    name: str
    mis_db: str
    bridge_db: str
    dropped: list[str] = field(default_factory=list)


def make_backend(name: str, work: Path, settings: BenchCoreSettings) -> Backend:
    if name == "sqlite":
        return Backend(name, f"sqlite:///{work / 'mis.db'}", f"sqlite:///{work / 'bridge.db'}")
    if name == "postgresql":
        tag = secrets.token_hex(3)
        mis_name, bridge_name = f"yd_bench_mis_{tag}", f"yd_bench_bridge_{tag}"
        mis_db = create_database(settings.pg_admin_url, mis_name)
        bridge_db = create_database(settings.pg_admin_url, bridge_name)
        return Backend(name, mis_db, bridge_db, [mis_name, bridge_name])
    raise ValueError(f"unknown back end {name!r} (sqlite, postgresql)")


def bench_backend(name: str, settings: BenchCoreSettings, root: Path, console: Console,
                  failed: list[str]) -> list[LevelResult]:
    """Seeds, starts the servers and measures every path and level; a server that fails is reported in `failed`."""
    work = root / name
    work.mkdir(parents=True)
    try:
        backend = make_backend(name, work, settings)
    except sa.exc.OperationalError as exc:
        console.print(f"[yellow]skipping {name}: server unreachable at {settings.pg_admin_url} "
                      f"({str(exc.orig).strip().splitlines()[0]})[/yellow]")
        return []
    servers: list[ServerProcess] = []
    results: list[LevelResult] = []
    try:
        roster, mis, bridge = seed_and_start_stack(
            work, mis_db=backend.mis_db, bridge_db=backend.bridge_db, accounts=settings.accounts,
            bank_id=settings.bank_id, ready_timeout_s=settings.ready_timeout_s, seed_timeout_s=600, cwd=REPO,
            servers=servers)
        accounts = ledger.read_roster(roster)
        console.print(f"[bold]{name}[/bold]: {settings.accounts:,} households, {len(accounts):,} paying accounts")
        targets = {"bridge": bridge.grpc_addr, "direct": mis.grpc_addr}
        crossed = {"bridge": {"bridge": bridge.popen.pid, "mis_adapter": mis.popen.pid},
                   "direct": {"mis_adapter": mis.popen.pid}}
        for path in (p.strip() for p in settings.paths.split(",") if p.strip()):
            results += measure(name, path, targets[path], settings.bank_id, accounts, settings, console,
                               crossed[path])
    except ProcessFailed as exc:
        console.print(f"[red]{name}: {exc}[/red]")
        failed.append(name)
    finally:
        for proc in reversed(servers):
            try:
                proc.stop(settings.stop_timeout_s)
            except ProcessFailed as exc:
                console.print(f"[red]{exc}[/red]")
        for db_name in backend.dropped:
            drop_database(settings.pg_admin_url, db_name)
    return results


def results_table(results: list[LevelResult]) -> Table:
    table = Table(title="bench-core: counter Pay, closed loop")
    for col in ("back end", "path", "in flight", "pays", "pays/s", "p50 ms", "p99 ms", "server CPU µs/pay",
                "errors"):
        table.add_column(col, justify="left" if col in ("back end", "path", "errors") else "right")
    for r in results:
        table.add_row(r.backend, r.path, str(r.in_flight), f"{r.pays:,}", f"{r.pays_per_s:,.1f}",
                      f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
                      " + ".join(f"{v:,} (sys {r.server_sys_us_per_pay[k]:,})"
                                 for k, v in r.server_cpu_us_per_pay.items()),
                      ", ".join(f"{k} {v}" for k, v in r.errors.items()))
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim bench-core", description=DESCRIPTION)
    add_settings_flags(parser, BenchCoreSettings)
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    settings = load_settings(BenchCoreSettings, args, args.config_file)
    console = Console(width=max(Console().width, BENCH_CONSOLE_WIDTH_MIN))
    root = Path(settings.work_dir)
    root = root if root.is_absolute() else REPO / root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    console.print(f"levels {settings.levels} in flight, {settings.level_duration_s} s each "
                  f"(+{settings.warmup_s} s warm-up); work dir {root}")
    results: list[LevelResult] = []
    failed: list[str] = []
    for backend in (b.strip() for b in settings.backends.split(",") if b.strip()):
        results += bench_backend(backend, settings, root, console, failed)
    console.print(results_table(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(r) for r in results], indent=2), encoding="utf-8")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}; logs under {root}[/red]")
    return 1 if failed else 0
