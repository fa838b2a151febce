"""`make bench-ratio`: how close a counter pay comes to the speed of the wire.

In one run, with the same client (one grpc.aio channel, one process) and
the same number of calls in flight, it measures
  (a) a bare 2-hop gRPC echo of the same messages: client → proxy → echo
      (`python -m bank_sim echo-link`, built like the bridge minus the work), and
  (b) counter pays through bridge → mis_adapter → database, for each back end
      (`--backends postgresql,sqlite,mariadb`; fresh databases, dropped afterwards),
and prints calls/s, p50/p99, the ratio pay/echo, each process's CPU per call
(utime+stime from /proc over the measured interval ÷ calls: the client — this
process —, the proxy and echo, the bridge and mis_adapter, and the database
server: on PostgreSQL the backends serving the benchmark's databases, plus the
server's shared background processes shown apart; on MariaDB the whole server
process) and the load average.

On PostgreSQL it also breaks the pays' database work down: the backends' CPU per
pay by database and role (each server names its pools with `application_name`:
`mis_adapter`, `mis_adapter/sealer`, `bridge`, `bridge/journal-writer`,
`bridge/resolver`, `bridge/sealer`, `.../metrics`, `.../health`), and per pay each
database's transactions committed and rolled back, rows inserted/updated/deleted,
each table's rows (HOT updates apart, with its index count) and scans, and the WAL
the server wrote (DbStats).

Closed loop by default: N tasks, call after call (`--in-flight`, 32). With
`--open-loop`, arrivals come at a fixed rate whatever earlier calls did
(latency counted from the intended start, an arrival finding every slot busy
is dropped), stepping through `--rates`; it prints the highest rate held
(nothing dropped or failed, ≥ 95 % of the rate achieved, p99 < `--p99-max-ms`).
`--latency-trace FILE` also writes every measured call (send time, latency, status) as CSV, to see
stalls on a timeline. The meter's own sampling (/proc and the database's statistics) runs in a child
process of its own (bank_sim.meter), over connections kept for the run: on the event loop it held back
every arrival due meanwhile (a 0.1-1 s stall at the start of each PostgreSQL measurement on a busy box);
on a thread of this process calls due during a 57-243 ms sample still answered up to 240 ms late.

Real processes on loopback; never kills a process it did not start; never
imports mis_adapter or bridge (their CLIs start them)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import sqlalchemy as sa
from hdrh.histogram import HdrHistogram
from pydantic import Field
from rich.console import Console

from bank_sim import ledger
from bank_sim.meter import CpuGroup, CpuMeter, MeterFailed, MeterSpec
from bank_sim.processes import ProcessFailed, ServerProcess, seed_and_start_stack, start_server
from yindian.v1 import billing_pb2, billing_pb2_grpc
from yindian_common.db import create_database, drop_database
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.server import channel_options
from yindian_common.settings import YinDianSettings, add_settings_flags, load_settings

REPO = Path(__file__).resolve().parents[1]
DESCRIPTION = ("Benchmark: counter pays through bridge -> mis_adapter -> database against a bare 2-hop gRPC echo "
               "of the same messages, in one run, with CPU per call of every process.")
PAY_MIN_FEN = 1_000
PAY_MAX_FEN = 30_000
ERROR_KINDS_MAX = 16
CONSOLE_WIDTH_MIN = 160
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
TERMINATED_EXIT = 143  # 128 + SIGTERM
HELD_SHARE_MIN = 0.95  # an open-loop step holds its rate when at least this share of it was achieved
MARIADB_COMMS = ("mariadbd", "mysqld")


class BenchRatioSettings(YinDianSettings):
    """`python -m bank_sim bench-ratio` (`make bench-ratio`)."""

    work_dir: str = Field("var/bench-ratio", description="work directory, emptied at the start of each run")
    accounts: int = Field(5000, ge=1, description="households the utility is seeded with")
    bank_id: str = Field("ICBC", description="the paying bank")
    backends: str = Field("postgresql", description="comma-separated back ends: postgresql, sqlite, mariadb")
    in_flight: int = Field(32, ge=1, le=4096, description="calls in flight (closed loop; the open loop's slot bound)")
    duration_s: float = Field(10.0, gt=0, description="measured seconds of each measurement")
    warmup_s: float = Field(2.0, ge=0, description="unmeasured warm-up before each measurement")
    open_loop: bool = Field(False, description="open loop: step through --rates, print the highest rate held")
    rates: str = Field("100,200,300,400,500,600,800,1000,1200,1500,1800,2200,2600,3000",
                       description="open loop: offered calls/s, in increasing order")
    open_loop_slots: int = Field(256, ge=1, le=100_000,
                                 description="open loop: calls in flight at most (an arrival finding none is dropped)")
    unheld_steps_max: int = Field(2, ge=1, description="open loop: stop stepping after this many unheld steps in a row")
    p99_max_ms: float = Field(50.0, gt=0, description="open loop: a rate is held while p99 stays under this")
    pg_admin_url: str = Field("postgresql://postgres@127.0.0.1:5432/postgres",
                              description="PostgreSQL server the benchmark databases are created on")
    mariadb_admin_url: str = Field("mysql://root@127.0.0.1:3306/mysql",
                                   description="MariaDB server the benchmark databases are created on")
    rpc_deadline_s: float = Field(10.0, gt=0, description="deadline of every call")
    seed_timeout_s: float = Field(600.0, gt=0, description="longest the seeding may run")
    ready_timeout_s: float = Field(60.0, gt=0, description="longest wait for a server's READY line")
    stop_timeout_s: float = Field(30.0, gt=0, description="longest wait for a server to exit after SIGTERM")
    latency_max_ms: int = Field(60_000, ge=1, description="largest latency the histograms record")
    bridge_args: str = Field("", description="extra options for the bridge, space-separated (e.g. '--max-workers 16')")
    mis_args: str = Field("", description="extra options for mis_adapter, space-separated")
    proxy_args: str = Field("", description="extra options for the echo's proxy, space-separated (e.g. --proxy-args=--aio)")
    latency_trace: str = Field("", description="also write every measured call as a CSV line here (measurement, "
                               "offered rate, send time s since the window opened, latency ms, status) to see "
                               "stalls on a timeline; empty: off")
    wait_sample_interval_s: float = Field(0.05, ge=0, le=10,
                                          description="PostgreSQL: how often the meter samples what the benchmark's "
                                                      "backends wait on during a pay measurement (pg_stat_activity; "
                                                      "printed as backends per sample by wait event, mean and "
                                                      "peak); 0: off")
    latency_trace_rows_max: int = Field(2_000_000, ge=1, le=20_000_000,
                                        description="most calls --latency-trace keeps per measurement")


# ---- drivers ----

@dataclass
class Measured:
    what: str
    mode: str
    offered_per_s: float | None
    calls: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    dropped: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cpu_ms_per_call: dict[str, float] = field(default_factory=dict)
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # PostgreSQL: backends' CPU by database and application_name, and the servers' counters (DbStats).
    db_role_cpu_ms_per_call: dict[str, float] = field(default_factory=dict)
    db_per_call: dict[str, dict[str, float]] = field(default_factory=dict)
    # PostgreSQL: '<database>:<wait event>' → backends per sample, mean and peak (meter.WaitCounts), and the samples
    db_waits: dict[str, dict[str, float]] = field(default_factory=dict)
    db_wait_samples: int = 0

    @property
    def held(self) -> bool:
        return (self.offered_per_s is not None and not self.dropped and not self.errors
                and self.calls_per_s >= HELD_SHARE_MIN * self.offered_per_s)


class PayFactory:
    """Fresh-serial counter pays on random roster accounts (the same for echo and pay)."""

    def __init__(self, accounts: list[str]) -> None:
        self._accounts = accounts
        self._prefix = f"R{secrets.token_hex(4)}"
        self._n = 0
        self._rng = random.Random(20261129)

    def __call__(self) -> billing_pb2.PayRequest:
        self._n += 1
        return billing_pb2.PayRequest(
            bank_serial=f"{self._prefix}{self._n:010d}", account_no=self._rng.choice(self._accounts),
            amount_fen=self._rng.randint(PAY_MIN_FEN, PAY_MAX_FEN), outlet_code="OUT001",
            teller_id=f"TLR001{self._n % 100:02d}", channel=billing_pb2.CHANNEL_COUNTER)


class Window:
    """What one measurement counts: calls that start after the warm-up and end inside the window."""

    def __init__(self, settings: BenchRatioSettings) -> None:
        self.max_us = settings.latency_max_ms * 1000
        self.hist = HdrHistogram(1, self.max_us, 3)
        self.errors: dict[str, int] = {}
        self.counted = 0
        self.dropped = 0
        self.start = time.perf_counter() + settings.warmup_s
        self.end = self.start + settings.duration_s
        self.trace_max = settings.latency_trace_rows_max if settings.latency_trace else 0
        self.trace: list[tuple[float, float, str]] = []  # (sent, answered, status) of each measured call

    def record(self, t0: float, t1: float, code: str) -> None:
        if t0 < self.start or t1 > self.end:
            return
        if len(self.trace) < self.trace_max:
            self.trace.append((t0, t1, code))
        if code:
            if code in self.errors or len(self.errors) < ERROR_KINDS_MAX:
                self.errors[code] = self.errors.get(code, 0) + 1
            return
        self.counted += 1
        self.hist.record_value(min(max(1, int((t1 - t0) * 1_000_000)), self.max_us))


async def _call(stub: billing_pb2_grpc.BillingServiceStub, req: billing_pb2.PayRequest,
                metadata: tuple[tuple[str, str], ...], deadline_s: float) -> str:
    try:
        await stub.Pay(req, timeout=deadline_s, metadata=metadata)
        return ""
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)


async def closed_loop(stub: billing_pb2_grpc.BillingServiceStub, make: PayFactory, settings: BenchRatioSettings,
                      metadata: tuple[tuple[str, str], ...], window: Window, on_window: Callable[[bool], None]
                      ) -> None:
    async def worker() -> None:
        while (t0 := time.perf_counter()) < window.end:
            code = await _call(stub, make(), metadata, settings.rpc_deadline_s)
            window.record(t0, time.perf_counter(), code)

    async def clock() -> None:
        await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
        await asyncio.to_thread(on_window, True)
        await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
        await asyncio.to_thread(on_window, False)

    await asyncio.gather(clock(), *(worker() for _ in range(settings.in_flight)))


async def open_loop(stub: billing_pb2_grpc.BillingServiceStub, make: PayFactory, settings: BenchRatioSettings,
                    metadata: tuple[tuple[str, str], ...], window: Window, on_window: Callable[[bool], None],
                    rate: float) -> None:
    slots = asyncio.Semaphore(settings.open_loop_slots)
    tasks: set[asyncio.Task[None]] = set()
    began = time.perf_counter()

    async def one(intended: float) -> None:
        try:
            code = await _call(stub, make(), metadata, settings.rpc_deadline_s)
            window.record(intended, time.perf_counter(), code)
        finally:
            slots.release()

    opening: asyncio.Task[None] | None = None
    i = 0
    while True:
        intended = began + i / rate
        if intended >= window.end:
            break
        now = time.perf_counter()
        if opening is None and now >= window.start:
            # The meter's sampler process reads /proc and the database's statistics (tens to hundreds of ms
            # on a busy box); this thread only waits for its answer, so the arrivals due meanwhile leave on time.
            opening = asyncio.create_task(asyncio.to_thread(on_window, True))
        if intended > now:
            await asyncio.sleep(intended - now)
        i += 1
        if slots.locked():
            if window.start <= intended < window.end:
                window.dropped += 1
            continue
        await slots.acquire()
        task = asyncio.create_task(one(intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if opening is not None:
        await opening
    await asyncio.to_thread(on_window, False)
    if tasks:
        await asyncio.gather(*tasks)


def write_trace(path: Path, what: str, rate: float | None, window: Window) -> None:
    """Append one measurement's calls to the CSV trace, in send order: measurement, offered rate
    ('' in the closed loop), send time in s since the window opened, latency in ms, status ('' = OK;
    'meter-start'/'meter-stop' = the benchmark's own CPU and statistics sampling, its start and
    duration as the client saw it: a request to the meter's sampler process and its answer, awaited on a
    thread beside the calls). A header line names the wall-clock
    instant the window opened, to line the trace up with server logs."""
    new = not path.exists()
    with path.open("a", encoding="utf-8") as f:
        if new:
            f.write("measurement,offered_per_s,sent_s,latency_ms,status\n")
        wall = time.time() - (time.perf_counter() - window.start)
        f.write(f"# {what} window opened at unix {wall:.6f}\n")
        offered = "" if rate is None else f"{rate:g}"
        for t0, t1, code in sorted(window.trace):
            f.write(f"{what},{offered},{t0 - window.start:.6f},{(t1 - t0) * 1000:.3f},{code}\n")


def measure(what: str, target: str, bank_id: str, make: PayFactory, settings: BenchRatioSettings,
            meter: CpuMeter, rate: float | None = None) -> Measured:
    """One measurement; CPU is metered over the window only."""
    window = Window(settings)
    cpu: dict[str, float] = {}

    def on_window(opening: bool) -> None:
        t0 = time.perf_counter()
        if opening:
            meter.start()
        else:
            cpu.update(meter.stop())
        if window.trace_max:
            window.trace.append((t0, time.perf_counter(), "meter-start" if opening else "meter-stop"))

    terminated: list[bool] = []

    async def run() -> None:
        # SIGTERM cancels the measurement as Ctrl-C does (asyncio.run's own SIGINT handling), from the
        # event loop: `_terminate` raising wherever the main thread is could surface inside grpc.aio's
        # Cython code (seen: a half-made AioChannel, then a segmentation fault).
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        outer = signal.getsignal(signal.SIGTERM)
        def on_sigterm() -> None:
            terminated.append(True)
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            metadata = ((BANK_ID_METADATA, bank_id),)
            async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
                stub = billing_pb2_grpc.BillingServiceStub(channel)
                driver: Awaitable[None] = (
                    closed_loop(stub, make, settings, metadata, window, on_window) if rate is None
                    else open_loop(stub, make, settings, metadata, window, on_window, rate))
                await driver
        finally:
            loop.remove_signal_handler(signal.SIGTERM)  # leaves SIG_DFL: the outer handler goes back
            signal.signal(signal.SIGTERM, outer)

    try:
        asyncio.run(run())
    except asyncio.CancelledError:
        if terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once, as `_terminate`
            raise Terminated from None
        raise
    if settings.latency_trace:
        write_trace(Path(settings.latency_trace), what, rate, window)
    calls = window.counted
    per = {name: round(s * 1000 / calls, 3) for name, s in cpu.items()} if calls else {}
    roles = ({name: round(s * 1000 / calls, 3)
              for name, s in sorted(meter.reading.role_cpu_s.items(), key=lambda x: -x[1])} if calls else {})
    db = meter.reading.db_per_call(calls) if calls else {}
    waits = meter.reading.waits
    return Measured(what, "closed" if rate is None else "open", rate, calls, round(calls / settings.duration_s, 1),
                    window.hist.get_value_at_percentile(50) / 1000, window.hist.get_value_at_percentile(99) / 1000,
                    window.dropped, window.errors, per, os.getloadavg(), roles, db,
                    waits.summary() if waits else {}, waits.samples if waits else 0)


# ---- the stacks ----

@dataclass
class Backend:
    name: str
    mis_db: str
    bridge_db: str
    admin_url: str = ""
    dropped: list[str] = field(default_factory=list)


def make_backend(name: str, work: Path, settings: BenchRatioSettings) -> Backend:
    if name == "sqlite":
        return Backend(name, f"sqlite:///{work / 'mis.db'}", f"sqlite:///{work / 'bridge.db'}")
    admin = {"postgresql": settings.pg_admin_url, "mariadb": settings.mariadb_admin_url}.get(name)
    if admin is None:
        raise ValueError(f"unknown back end {name!r} (postgresql, sqlite, mariadb)")
    tag = secrets.token_hex(3)
    mis_name, bridge_name = f"yd_ratio_mis_{tag}", f"yd_ratio_bridge_{tag}"
    return Backend(name, create_database(admin, mis_name), create_database(admin, bridge_name), admin,
                   [mis_name, bridge_name])


def pay_meter_spec(backend: Backend, client: int, bridge: int, mis: int, wait_interval_s: float = 0.0) -> MeterSpec:
    """The pays' meter: client, bridge and mis_adapter, and the database server's processes that serve the
    benchmark (none for SQLite: it runs in the servers). PostgreSQL: the backends serving the benchmark's
    two databases (found in pg_stat_activity), the shared background processes apart, the backends by
    '<database>:<application_name>' ('mis:mis_adapter', 'bridge:bridge/journal-writer', ...; the servers
    name each pool by role, yindian_common.db.role_name), the databases' counters (DbStats) and, every
    `wait_interval_s` (> 0), what their backends wait on (meter.WaitSampler)."""
    groups = [CpuGroup("client", (client,)), CpuGroup("bridge", (bridge,)), CpuGroup("mis_adapter", (mis,))]
    if backend.name == "postgresql":
        return MeterSpec((*groups, CpuGroup("postgres backends", pg="backends"),
                          CpuGroup("postgres shared (walwriter, checkpointer, ...)", pg="aux")),
                         backend.admin_url, tuple(zip(("mis", "bridge"), backend.dropped, strict=True)),
                         roles=True, stats=True, wait_interval_s=wait_interval_s)
    if backend.name == "mariadb":
        return MeterSpec((*groups, CpuGroup("mariadb (whole server)", comm=MARIADB_COMMS)))
    return MeterSpec(tuple(groups))


def start_echo(work: Path, settings: BenchRatioSettings, servers: list[ServerProcess]) -> ServerProcess:
    echo = start_server("echo", ["bank_sim", "echo-link", "--role", "echo", "--insecure", "--listen", "127.0.0.1:0",
                                 "--metrics-port", "0"], log_dir=work, ready_timeout_s=settings.ready_timeout_s,
                        cwd=REPO)
    servers.append(echo)
    proxy = start_server("proxy", ["bank_sim", "echo-link", "--role", "proxy", "--insecure", "--listen",
                                   "127.0.0.1:0", "--upstream", echo.grpc_addr, "--bank-id", settings.bank_id,
                                   "--metrics-port", "0", *settings.proxy_args.split()], log_dir=work,
                         ready_timeout_s=settings.ready_timeout_s, cwd=REPO)
    servers.append(proxy)
    return proxy


def fmt(m: Measured) -> str:
    cpu = "  ".join(f"{k} {v:.3f}" for k, v in m.cpu_ms_per_call.items())
    offered = f"offered {m.offered_per_s:>6,.0f}/s " if m.offered_per_s is not None else ""
    extra = (f" dropped {m.dropped}" if m.dropped else "") + (f" errors {m.errors}" if m.errors else "")
    la = " ".join(f"{x:.2f}" for x in m.load_average)
    line = (f"{m.what:<18} {offered}{m.calls_per_s:>8,.1f}/s  p50 {m.p50_ms:7.2f} ms  p99 {m.p99_ms:7.2f} ms  "
            f"CPU ms/call: {cpu}  load {la}{extra}")
    if m.db_role_cpu_ms_per_call:
        line += "\n  postgres backends by database:role, CPU ms/call: " + "  ".join(
            f"{k} {v:.3f}" for k, v in m.db_role_cpu_ms_per_call.items())
    if m.db_wait_samples:
        line += f"\n  {fmt_waits(m.db_waits, m.db_wait_samples)}"
    return line + "".join(f"\n  {x}" for x in fmt_db(m.db_per_call))


WAITS_SHOWN_MAX = 10


def fmt_waits(waits: dict[str, dict[str, float]], samples: int) -> str:
    """The backends' states by database, largest mean first: backends per sample, mean (peak)."""
    shown = "  ".join(f"{k} {v['mean']:.2f} ({v['peak']:g})" for k, v in list(waits.items())[:WAITS_SHOWN_MAX])
    return (f"postgres backends by database:wait, mean (peak) per sample of {samples:,}: "
            f"{shown or 'none busy at any sample'}")


def fmt_db(per: dict[str, dict[str, float]]) -> list[str]:
    """Per call: each database's transactions and rows, its tables' rows (i inserted, u updated of which
    h HOT, d deleted, seq/idx scans, dead = change of its dead row versions, buffer blocks hit in the table and
    in its indexes; ix = indexes on the table), and the server's WAL."""
    lines = []
    for label in (k for k in per if "." not in k and k != "wal"):
        d = per[label]
        tables = []
        for key, t in per.items():
            if key.startswith(f"{label}."):
                parts = [f"i{t['n_tup_ins']:g}" if t["n_tup_ins"] else "",
                         f"u{t['n_tup_upd']:g}(h{t['n_tup_hot_upd']:g})" if t["n_tup_upd"] else "",
                         f"d{t['n_tup_del']:g}" if t["n_tup_del"] else "",
                         f"seq{t['seq_scan']:g}" if t["seq_scan"] else "", f"idx{t['idx_scan']:g}",
                         f"dead{t['n_dead_tup']:+g}" if t["n_dead_tup"] else "",
                         f"blocks hit heap {t['heap_blks_hit']:g} index {t['idx_blks_hit']:g}"]
                tables.append(f"{key.split('.', 1)[1]} ({t['indexes']:g} ix) " + " ".join(p for p in parts if p))
        lines.append(f"db {label} per call: commits {d['xact_commit']:g} rollbacks {d['xact_rollback']:g}  rows "
                     f"ins {d['tup_inserted']:g} upd {d['tup_updated']:g} del {d['tup_deleted']:g}  blocks hit "
                     f"{d['blks_hit']:g} read {d['blks_read']:g}")
        lines.extend(f"    {t}" for t in tables)
    if "wal" in per:
        w = per["wal"]
        lines.append(f"WAL per call (whole server): {w['bytes']:,.0f} bytes, {w['records']:g} records, "
                     f"{w['fpi']:g} full-page images, {w['syncs']:g} flushes to disk")
    return lines


def still_serving(servers: Sequence[ServerProcess], what: str) -> None:
    """Raises ProcessFailed if a server the measurement called through has exited: its figures measure the
    failure (every call answered UNAVAILABLE at once), not the path, and are not printed."""
    for proc in servers:
        code = proc.popen.poll()
        if code is not None:
            raise ProcessFailed(f"{proc.name} exited (code {code}) during the {what} measurement: no figures; "
                                f"its log: {proc.log_path}")


def run_mode(what: str, target: str, make: PayFactory, settings: BenchRatioSettings, meter: CpuMeter,
             console: Console, servers: Sequence[ServerProcess]) -> list[Measured]:
    """Closed loop: one measurement. Open loop: the stepped rates, until unheld twice in a row. Each
    measurement's figures are printed only if every server in `servers` outlived it."""
    if not settings.open_loop:
        m = measure(what, target, settings.bank_id, make, settings, meter)
        still_serving(servers, what)
        console.print(fmt(m))
        return [m]
    steps: list[Measured] = []
    unheld = 0
    for rate in (float(x) for x in settings.rates.split(",") if x.strip()):
        m = measure(what, target, settings.bank_id, make, settings, meter, rate)
        still_serving(servers, what)
        console.print(fmt(m) + ("" if m.held and m.p99_ms < settings.p99_max_ms else "  (not held)"))
        steps.append(m)
        unheld = 0 if m.held and m.p99_ms < settings.p99_max_ms else unheld + 1
        if unheld >= settings.unheld_steps_max:
            break
    return steps


def highest_held(steps: list[Measured], p99_max_ms: float) -> float:
    return max((m.offered_per_s or 0.0 for m in steps if m.held and m.p99_ms < p99_max_ms), default=0.0)


def summary(label: str, echo: list[Measured], pays: list[Measured], settings: BenchRatioSettings) -> str:
    if settings.open_loop:
        e, p = highest_held(echo, settings.p99_max_ms), highest_held(pays, settings.p99_max_ms)
        ratio = p / e if e else 0.0
        return (f"{label}: highest rate held with p99 < {settings.p99_max_ms:g} ms: pay {p:,.0f}/s, "
                f"echo {e:,.0f}/s, ratio pay/echo {ratio:.2f}")
    ratio = pays[0].calls_per_s / echo[0].calls_per_s if echo[0].calls_per_s else 0.0
    return (f"{label}: {settings.in_flight} in flight: pay {pays[0].calls_per_s:,.1f}/s (p99 {pays[0].p99_ms:.1f} ms), "
            f"echo {echo[0].calls_per_s:,.1f}/s (p99 {echo[0].p99_ms:.1f} ms), ratio pay/echo {ratio:.2f}")


def bench_backend(name: str, settings: BenchRatioSettings, root: Path, proxy: ServerProcess, echo: ServerProcess,
                  console: Console, failed: list[str]) -> dict[str, object]:
    work = root / name
    work.mkdir(parents=True)
    try:
        backend = make_backend(name, work, settings)
    except sa.exc.OperationalError as exc:
        console.print(f"[yellow]skipping {name}: server unreachable ({str(exc.orig).strip().splitlines()[0]})[/yellow]")
        return {}
    servers: list[ServerProcess] = []
    out: dict[str, object] = {}
    meters: list[CpuMeter] = []
    try:
        roster, mis, bridge = seed_and_start_stack(
            work, mis_db=backend.mis_db, bridge_db=backend.bridge_db, accounts=settings.accounts,
            bank_id=settings.bank_id, ready_timeout_s=settings.ready_timeout_s,
            seed_timeout_s=settings.seed_timeout_s, cwd=REPO, servers=servers,
            bridge_args=settings.bridge_args.split(), mis_args=settings.mis_args.split())
        accounts = ledger.read_roster(roster)
        make = PayFactory(accounts)
        me = os.getpid()
        echo_meter = CpuMeter(MeterSpec((CpuGroup("client", (me,)), CpuGroup("proxy", (proxy.popen.pid,)),
                                         CpuGroup("echo", (echo.popen.pid,)))))
        meters.append(echo_meter.open())
        pay_meter = CpuMeter(pay_meter_spec(backend, me, bridge.popen.pid, mis.popen.pid,
                                            settings.wait_sample_interval_s))
        meters.append(pay_meter.open())
        made = f"; databases {', '.join(backend.dropped)}" if backend.dropped else ""
        console.print(f"[bold]{name}[/bold]: {settings.accounts:,} households, {len(accounts):,} paying accounts{made}")
        echo_steps = run_mode("echo (2 hops)", proxy.grpc_addr, make, settings, echo_meter, console, (proxy, echo))
        pay_steps = run_mode(f"pay {name}", bridge.grpc_addr, make, settings, pay_meter, console, servers)
        line = summary(name, echo_steps, pay_steps, settings)
        console.print(f"[bold]{line}[/bold]")
        out = {"backend": name, "echo": [asdict(m) for m in echo_steps], "pay": [asdict(m) for m in pay_steps],
               "summary": line}
    except (ProcessFailed, MeterFailed) as exc:
        console.print(f"[red]{name}: {exc}[/red]")
        failed.append(name)
    finally:
        for meter in meters:  # its statistics connections closed before the databases are dropped
            meter.close()
        for proc in reversed(servers):
            try:
                proc.stop(settings.stop_timeout_s)
            except ProcessFailed as exc:
                console.print(f"[red]{exc}[/red]")
        for db_name in backend.dropped:
            drop_database(backend.admin_url, db_name)
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, `pkill`): the run stops as on Ctrl-C, on the same way out (the servers stopped,
    the databases dropped, no figures). Before, the default action ended the process at once and left both
    behind."""


def _terminate(_signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once, as before
    raise Terminated


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim bench-ratio", description=DESCRIPTION)
    add_settings_flags(parser, BenchRatioSettings)
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    settings = load_settings(BenchRatioSettings, args, args.config_file)
    console = Console(width=max(Console().width, CONSOLE_WIDTH_MIN))
    root = Path(settings.work_dir)
    root = root if root.is_absolute() else REPO / root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    mode = (f"open loop, rates {settings.rates}/s, at most {settings.open_loop_slots} in flight" if settings.open_loop
            else f"closed loop, {settings.in_flight} in flight")
    console.print(f"bench-ratio: {mode}; {settings.duration_s:g} s per measurement after {settings.warmup_s:g} s "
                  f"warm-up; {os.cpu_count()} CPUs; work dir {root}")
    failed: list[str] = []
    results: list[dict[str, object]] = []
    echo_servers: list[ServerProcess] = []
    signal.signal(signal.SIGTERM, _terminate)
    try:
        proxy = start_echo(root, settings, echo_servers)
        for backend in (b.strip() for b in settings.backends.split(",") if b.strip()):
            r = bench_backend(backend, settings, root, proxy, echo_servers[0], console, failed)
            if r:
                results.append(r)
    except ProcessFailed as exc:
        console.print(f"[red]{exc}[/red]")
        failed.append("echo")
    except KeyboardInterrupt as stop:
        # The servers were stopped and the databases dropped on the way out (bench_backend's finally);
        # nothing measured is printed: a window cut short has no figures.
        terminated = isinstance(stop, Terminated)
        console.print(f"[red]{'terminated' if terminated else 'interrupted'}: no figures[/red]")
        return TERMINATED_EXIT if terminated else INTERRUPTED_EXIT
    finally:
        for proc in reversed(echo_servers):
            try:
                proc.stop(settings.stop_timeout_s)
            except ProcessFailed as exc:
                console.print(f"[red]{exc}[/red]")
    for r in results:
        console.print(str(r["summary"]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2), encoding="utf-8")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}; logs under {root}[/red]")
    return 1 if failed else 0
