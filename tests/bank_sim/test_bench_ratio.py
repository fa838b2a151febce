"""`make bench-ratio`: one short real run on SQLite (echo and pays measured with
every process's CPU), and the open loop's "highest rate held" rule."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bank_sim.bench_ratio import (
    BenchRatioSettings,
    Measured,
    PayFactory,
    Window,
    highest_held,
    open_loop,
    write_trace,
)
from bank_sim.meter import CpuGroup, CpuMeter, MeterFailed, MeterSpec, WaitSampler
from tests.support.databases import admin_url
from tests.support.procs import REPO

pytestmark = pytest.mark.timeout(180)


def step(rate: float, per_s: float, p99_ms: float, dropped: int = 0, errors: dict[str, int] | None = None
         ) -> Measured:
    return Measured("pay", "open", rate, int(per_s * 10), per_s, 1.0, p99_ms, dropped, errors or {})


def test_a_rate_is_held_only_when_achieved_without_drops_errors_or_a_slow_p99() -> None:
    steps = [step(100, 100, 10), step(200, 199, 20), step(300, 299, 60), step(400, 350, 30),
             step(500, 500, 30, dropped=1), step(600, 600, 30, errors={"UNAVAILABLE": 1})]
    assert highest_held(steps, 50.0) == 200
    assert highest_held([], 50.0) == 0


def test_cpu_meter_counts_only_what_a_process_used_inside_the_window() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with CpuMeter(MeterSpec((CpuGroup("child", (child.pid,)),))) as meter:
            meter.start()
            used = meter.stop()
        assert 0.0 <= used["child"] < 0.05  # idle, blocked on stdin
    finally:
        child.kill()
        child.wait(10)


BURN = """
import sys, time
print("ready", flush=True)
sys.stdin.readline()
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("done", flush=True)
sys.stdin.read()
"""


def _burn_cpu_s(seconds: float) -> None:
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass


def test_the_meter_samples_from_a_process_of_its_own_and_counts_what_each_process_burned() -> None:
    """A meter sampling on a thread of the benchmark's process held the GIL against the client's event loop
    (57-243 ms at a PostgreSQL window's start: the calls due meanwhile answered up to 240 ms late). The
    sampler is another process, reading this process's CPU from /proc like any other's: a child that burns
    0.3 s of CPU and this process burning 0.2 s inside the window come out as such."""
    child = subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        with CpuMeter(MeterSpec((CpuGroup("client", (os.getpid(),)), CpuGroup("child", (child.pid,))))) as meter:
            assert meter.sampler_pid is not None and meter.sampler_pid not in (os.getpid(), child.pid)
            assert Path(f"/proc/{meter.sampler_pid}").exists()
            meter.start()
            child.stdin.write("go\n")
            child.stdin.flush()
            _burn_cpu_s(0.2)
            assert child.stdout.readline().strip() == "done"
            used = meter.stop()
            sampler = meter.sampler_pid
        assert 0.28 <= used["child"] < 0.4, used
        assert 0.18 <= used["client"] < 0.5, used
        assert not Path(f"/proc/{sampler}").exists() or Path(f"/proc/{sampler}/stat").read_text().split()[2] == "Z"
    finally:
        child.kill()
        child.wait(10)


def test_a_sampler_that_does_not_answer_fails_the_measurement_within_its_bound_and_is_killed() -> None:
    with CpuMeter(MeterSpec((CpuGroup("client", (os.getpid(),)),)), answer_timeout_s=0.5) as meter:
        assert meter.sampler_pid is not None
        os.kill(meter.sampler_pid, signal.SIGSTOP)  # alive, never answering
        with pytest.raises(MeterFailed, match="did not answer 'start' within 0.5 s"):
            meter.start()
        with pytest.raises(MeterFailed, match="not running"):
            meter.stop()
        assert meter._proc is not None and not meter._proc.is_alive()


def test_one_short_run_prints_the_ratio_and_cpu_of_every_process(tmp_path: Path) -> None:
    # A pay counts only if it starts and ends inside the window: the window must outlast a pay's latency on a
    # loaded box (a 1 s window counted 0 pays once at load 25 while 212 echo calls fitted).
    out = tmp_path / "ratio.json"
    run = subprocess.run([sys.executable, "-m", "bank_sim", "bench-ratio", "--backends", "sqlite", "--accounts", "200",
                          "--in-flight", "4", "--duration-s", "3", "--warmup-s", "0.5",
                          "--work-dir", str(tmp_path / "work"), "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ratio pay/echo" in run.stdout
    (result,) = json.loads(out.read_text())
    echo, pay = result["echo"][0], result["pay"][0]
    assert echo["calls"] > 0 and pay["calls"] > 0 and not echo["errors"] and not pay["errors"]
    assert set(echo["cpu_ms_per_call"]) == {"client", "proxy", "echo"}
    assert set(pay["cpu_ms_per_call"]) == {"client", "bridge", "mis_adapter"}
    assert all(v > 0 for v in pay["cpu_ms_per_call"].values())
    assert len(pay["load_average"]) == 3


def _session_processes(sid: int, *, with_pids: bool = False) -> list[Any]:
    """The command lines (with_pids: (pid, command line)) of the processes alive in session `sid` (the
    benchmark's and its servers')."""
    alive: list[Any] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and ") Z " not in (entry / "stat").read_text():
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    alive.append((entry.name, cmd) if with_pids else cmd)
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
    return alive


def _run_bench_until(tmp_path: Path, duration_s: float, marker: str, act: Callable[[int], None],
                     backend: str = "sqlite") -> tuple[int, int, str, float]:
    """bench-ratio on `backend` in a session of its own; at the first output line starting with `marker`, `act(its
    pid)`; then its pid (its session's id), exit code, all it printed, and the seconds from `act` to its exit
    (killed if it outlives the test's bounds)."""
    bench = subprocess.Popen([sys.executable, "-m", "bank_sim", "bench-ratio", "--backends", backend, "--accounts",
                              "200", "--in-flight", "4", "--duration-s", str(duration_s), "--warmup-s", "0.5",
                              "--work-dir", str(tmp_path / "work")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    assert bench.stdout is not None
    lines: list[str] = []
    try:
        for line in bench.stdout:  # bounded by the test's timeout
            lines.append(line)
            if line.startswith(marker):
                break
        assert lines and lines[-1].startswith(marker), "".join(lines)
        acted = time.monotonic()
        act(bench.pid)
        rest, _ = bench.communicate(timeout=120)
        return bench.pid, bench.returncode, "".join(lines) + rest, time.monotonic() - acted
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait(10)


def test_ctrl_c_stops_the_run_at_once_with_no_figures_and_leaves_no_process(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the process group) during a measurement: the benchmark stops within seconds, says so,
    exits 130 (it used to end on a KeyboardInterrupt traceback), prints no ratio, and every server it started is
    gone."""
    # "<backend>: N households, M paying accounts": the stack is up, the echo's 120 s measurement begins
    session, code, out, took = _run_bench_until(tmp_path, 120, "sqlite:", lambda pid: os.killpg(pid, signal.SIGINT))
    assert code == 130, out
    assert took < 30, f"stopped {took:.1f} s after Ctrl-C, in a 120 s window\n{out}"
    assert "interrupted: no figures" in out and "ratio pay/echo" not in out, out
    # Its helpers (multiprocessing's resource tracker, the meter's sampler) end as their pipes close behind it.
    gone_by = time.monotonic() + 10
    while (alive := _session_processes(session)) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert alive == [], out


def test_sigterm_stops_the_run_with_no_figures_drops_its_databases_and_leaves_no_process(tmp_path: Path) -> None:
    """SIGTERM to the benchmark alone (`kill PID`, `pkill`), during a measurement on PostgreSQL: it stops within
    seconds, says so, exits 143, prints no ratio, stops every server it started and drops the two databases it
    made (the default action used to end it at once and leave both behind)."""
    admin = admin_url("postgresql")  # skip (or fail under CI) without a server
    session, code, out, took = _run_bench_until(tmp_path, 120, "postgresql:",
                                                lambda pid: os.kill(pid, signal.SIGTERM), backend="postgresql")
    assert code == 143, out
    assert took < 60, f"stopped {took:.1f} s after SIGTERM, in a 120 s window\n{out}"
    assert "terminated: no figures" in out and "ratio pay/echo" not in out, out
    made = out.split("; databases ", 1)[1].split("\n", 1)[0].split(", ")
    assert len(made) == 2 and all(name.startswith("yd_ratio_") for name in made), out
    engine = sa.create_engine(admin)
    try:
        with engine.connect() as conn:
            left = conn.execute(sa.text("SELECT datname FROM pg_database WHERE datname IN :names")
                                .bindparams(sa.bindparam("names", expanding=True)), {"names": made}).scalars().all()
    finally:
        engine.dispose()
    assert left == [], out
    gone_by = time.monotonic() + 10
    while (alive := _session_processes(session)) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert alive == [], out


def test_a_server_dying_during_a_measurement_fails_the_run_with_no_figures(tmp_path: Path) -> None:
    """The bridge killed during the pay measurement: every call after answers UNAVAILABLE at once, which used to be
    printed as that back end's pays/s and ratio. Now the back end fails, naming the server, and no ratio is printed."""
    def kill_bridge(session: int) -> None:
        (bridge,) = [int(pid) for pid, cmd in _session_processes(session, with_pids=True) if " -m bridge serve" in cmd]
        os.kill(bridge, signal.SIGKILL)

    _, code, out, _ = _run_bench_until(tmp_path, 4, "echo (2 hops)", kill_bridge)  # the pay measurement begins
    assert code == 1, out
    assert "bridge exited (code -9) during the pay sqlite measurement" in out, out
    assert "ratio pay/echo" not in out and "failed: sqlite" in out, out


def test_on_postgresql_it_breaks_the_database_work_down_by_role_and_table(tmp_path: Path) -> None:
    """Each server names its pools (application_name), so the backends' CPU comes out by role, and the
    database counters per pay name the tables a pay writes."""
    admin_url("postgresql")  # skip (or fail under CI) without a server
    out = tmp_path / "ratio.json"
    run = subprocess.run([sys.executable, "-m", "bank_sim", "bench-ratio", "--backends", "postgresql", "--accounts",
                          "200", "--in-flight", "4", "--duration-s", "3", "--warmup-s", "0.5",
                          "--work-dir", str(tmp_path / "work"), "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout + run.stderr
    (result,) = json.loads(out.read_text())
    pay = result["pay"][0]
    assert pay["calls"] > 0 and not pay["errors"]
    roles = pay["db_role_cpu_ms_per_call"]
    assert {"mis:mis_adapter", "bridge:bridge/journal-writer", "mis:mis_adapter/sealer", "bridge:bridge/sealer",
            "bridge:bridge/resolver"} <= set(roles), roles
    assert roles["mis:mis_adapter"] > 0
    db = pay["db_per_call"]
    assert {"mis", "bridge", "wal", "mis.payments", "bridge.bridge_journal"} <= set(db), sorted(db)
    assert db["mis"]["xact_commit"] > 0 and db["mis.payments"]["n_tup_ins"] > 0
    assert db["mis.payments"]["indexes"] >= 2 and db["wal"]["bytes"] > 0
    assert 0 < db["wal"]["syncs"] <= db["mis"]["xact_commit"] + db["bridge"]["xact_commit"], db["wal"]
    assert "postgres backends by database:role" in run.stdout and "db mis per call" in run.stdout
    # what the backends waited on, sampled through the 3 s window (every 50 ms by default): the pays' own databases only
    assert pay["db_wait_samples"] >= 30, pay["db_wait_samples"]
    waits = pay["db_waits"]
    assert waits and all(k.split(":", 1)[0] in ("mis", "bridge") for k in waits), waits
    assert any(k.startswith("mis:") for k in waits), waits
    assert "postgres backends by database:wait, mean (peak) per sample of" in run.stdout


def _until(what: str, done: Callable[[], bool], bound_s: float = 30.0) -> None:
    deadline = time.monotonic() + bound_s
    while not done():
        assert time.monotonic() < deadline, f"not within {bound_s:g} s: {what}"
        time.sleep(0.01)


def test_the_wait_sampler_counts_a_backend_held_on_a_row_lock_and_the_transaction_holding_it(pg_url: str) -> None:
    """A pay measurement's p99 can be set by the database holding every commit (a slow WAL flush) rather than
    by CPU: the meter samples what the benchmark's backends wait on. Here one transaction holds a row lock
    (idle in transaction: waiting for its client) and another backend waits for it (Lock:transactionid):
    at every sample one of each, nothing on CPU; the sampler's own backend is not counted."""
    url = sa.make_url(pg_url)
    database = url.database
    assert database is not None
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY, n int)"))
        conn.execute(sa.text("INSERT INTO t VALUES (1, 0)"))
    holder = engine.connect()
    blocked_out: list[object] = []
    try:
        holder.execute(sa.text("SELECT n FROM t WHERE id = 1 FOR UPDATE"))

        def blocked() -> None:
            with engine.begin() as conn:
                blocked_out.append(conn.execute(sa.text("UPDATE t SET n = n + 1 WHERE id = 1 RETURNING n")).scalar())

        waiter = threading.Thread(target=blocked, daemon=True)
        waiter.start()
        with engine.connect() as probe:
            _until("the update waits for the row lock", lambda: probe.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'transactionid' "
                "AND datname = current_database()")).scalar_one() == 1)
        sampler = WaitSampler(admin_url("postgresql"), {database: "db"}, 0.01)
        try:
            sampler.start()
            _until("five samples", lambda: sampler.samples >= 5)
            counts = sampler.stop()
        finally:
            sampler.dispose()
        waits = counts.summary()
        assert counts.samples >= 5
        assert waits == {"db:Lock:transactionid": {"mean": 1.0, "peak": 1},
                         "db:idle in transaction": {"mean": 1.0, "peak": 1}}, waits
        holder.commit()
        waiter.join(30)
        assert blocked_out == [1]
    finally:
        holder.close()
        engine.dispose()


class _InstantStub:
    """A BillingService stub whose Pay answers at once, counting the calls made."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen = threading.Event()
        self.wanted = 0

    async def Pay(self, req: object, timeout: float, metadata: object) -> None:  # noqa: N802 (the gRPC name)
        self.calls += 1
        if self.wanted and self.calls >= self.wanted:
            self.seen.set()


def test_the_open_loop_keeps_sending_while_the_meter_samples_and_traces_every_call(tmp_path: Path) -> None:
    """The meter's statistics reads took 0.1-1 s on a busy PostgreSQL; run on the event loop they held back
    every arrival due meanwhile (latency counted from the intended start: a stall at each window's start).
    Here the meter's start waits until calls made after the window opened arrive: it can only return
    if the arrivals keep leaving while it samples. The trace names every measured call and the meter."""
    settings = BenchRatioSettings(warmup_s=0.1, duration_s=0.4, latency_trace=str(tmp_path / "trace.csv"))
    window = Window(settings)
    stub = _InstantStub()
    sampled: list[bool] = []

    def on_window(opening: bool) -> None:
        if opening:
            stub.wanted = stub.calls + 5
            sampled.append(stub.seen.wait(10))
        window.trace.append((time.perf_counter(), time.perf_counter(), "meter-start" if opening else "meter-stop"))

    asyncio.run(open_loop(stub, PayFactory(["0000000001"]), settings, (), window, on_window, 100.0))  # type: ignore[arg-type]
    assert sampled == [True]
    assert window.counted >= 30 and not window.dropped and not window.errors
    write_trace(Path(settings.latency_trace), "pay sqlite", 100.0, window)
    lines = Path(settings.latency_trace).read_text().splitlines()
    assert lines[0] == "measurement,offered_per_s,sent_s,latency_ms,status"
    assert lines[1].startswith("# pay sqlite window opened at unix ")
    rows = [line.split(",") for line in lines[2:]]
    calls = [r for r in rows if r[4] == ""]
    assert len(calls) == window.counted and {r[4] for r in rows} == {"", "meter-start", "meter-stop"}
    assert all(r[0] == "pay sqlite" and r[1] == "100" and 0 <= float(r[2]) < 0.4 and float(r[3]) >= 0 for r in calls)
