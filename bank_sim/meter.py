"""bench-ratio's meter: CPU per process from /proc and PostgreSQL's own counters, sampled at a
measurement window's edges by a child process of its own.

The sampling (reads of /proc, pg_stat_activity for the backends' pids and roles, pg_stat_database,
pg_stat_user_tables/statio and pg_stat_wal through SQLAlchemy) used to run on a thread of the benchmark's
client process: at a PostgreSQL window's start it took 57-243 ms on a busy box and the calls due meanwhile
answered up to 240 ms late, suspected to be a GIL convoy against the client's event loop. Here the client only
sends "start"/"stop" down a pipe and waits for the answer in a blocking poll (no GIL held); a spawned sampler
process does the reads, so the meter holds nothing the client's loop needs and its own CPU is not counted as
the client's. (Session 14, 13 interleaved runs at load 2-22: the opening sample as the client saw it took 42-871 ms
(median 269) from a thread and 36-727 ms (median 87) from the sampler, shorter in 12 of 13; but a probe, a
grpc.aio open loop at 150-200/s with the same sample taken from a thread, from the sampler or not at all,
cycled, found the calls sent during a sample delayed alike either way: a sample costs about 5 ms of Python
and 10 ms of PostgreSQL CPU, and on a loaded 2-core box the delay follows the load.) Every wait is bounded: a
sampler that does not answer in time fails the measurement (MeterFailed) and is killed; it dies with the
benchmark (daemonic, and it exits when its pipe closes; it ignores Ctrl-C, which the benchmark handles by
closing it). The benchmark's main module must be import-safe (spawn).

Between a window's edges the sampler can also sample what the benchmark's PostgreSQL backends are doing
(`WaitSampler`, `MeterSpec.wait_interval_s`): every interval, one read of pg_stat_activity, each backend
serving a call counted by its wait event (on CPU when it waits for nothing; "idle in transaction" when
its transaction waits for its client). The mean per sample is how many backends were in that state on
average (PostgreSQL's "active sessions"), the peak the most at one sample: a pay's p99 set by a WAL flush
that held every commit shows as a peak of LWLock:WALWrite, not as CPU."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import psycopg
import sqlalchemy as sa

from yindian_common.db import normalize_url

PG_AUX_TYPES = ("walwriter", "checkpointer", "background writer", "autovacuum launcher", "logical replication launcher")
METER_APP = "bench-ratio"  # application_name of the benchmark's own statistics reads
SAMPLER_READY_TIMEOUT_S = 60.0  # a spawned Python importing SQLAlchemy and connecting, on a loaded box
ANSWER_TIMEOUT_S = 30.0  # one sample: /proc and a handful of statistics queries
EXIT_TIMEOUT_S = 10.0
WAIT_READ_TIMEOUT_MS = 2_000  # one pg_stat_activity read of the wait sampler (statement_timeout)
WAIT_SAMPLES_MAX = 1_000_000  # samples one window keeps counting (at 10 ms: 2.8 hours)


class MeterFailed(RuntimeError):
    """The sampler did not answer within its bound, failed, or is gone: the measurement has no figures."""


# ---- CPU from /proc ----

def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    ticks = stat.rsplit(")", 1)[1].split()
    return (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")


def pids_by_comm(names: tuple[str, ...]) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", encoding="ascii", errors="replace") as f:
                    if f.read().strip() in names:
                        out.append(int(entry))
            except OSError:
                continue
    return out


@dataclass(frozen=True)
class CpuGroup:
    """A named set of processes whose CPU is summed, re-read at each sample: fixed `pids`, the processes
    named `comm`, or (`pg`) PostgreSQL's "backends" serving the meter's databases (the meter's own left
    out) or its shared "aux" background processes. A description, not a callable: the sampler process
    resolves it."""
    name: str
    pids: tuple[int, ...] = ()
    comm: tuple[str, ...] = ()
    pg: str = ""


@dataclass(frozen=True)
class MeterSpec:
    """What a meter samples. `pg_admin_url` with `pg_databases` (label → database name): the backends of
    those databases can be grouped by '<label>:<application_name>' (`roles`), and their counters read
    (`stats`, DbStats)."""
    groups: tuple[CpuGroup, ...]
    pg_admin_url: str = ""
    pg_databases: tuple[tuple[str, str], ...] = ()
    roles: bool = False
    stats: bool = False
    wait_interval_s: float = 0.0  # > 0: sample the backends' wait events this often (WaitSampler); 0: off


@dataclass
class Reading:
    """One measurement's figures: CPU seconds per group and per role, database counters' changes."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    role_cpu_s: dict[str, float] = field(default_factory=dict)
    db_delta: dict[str, dict[str, float]] = field(default_factory=dict)
    indexes: dict[str, int] = field(default_factory=dict)  # "label.table" → indexes on it
    waits: WaitCounts | None = None

    def db_per_call(self, calls: int) -> dict[str, dict[str, float]]:
        """Each counter's change ÷ calls; tables that did not change are left out."""
        out: dict[str, dict[str, float]] = {}
        for key, d in self.db_delta.items():
            if "." in key and not any(d.values()):
                continue
            out[key] = {k: round(v / calls, 3) for k, v in d.items()}
            if key in self.indexes:
                out[key]["indexes"] = self.indexes[key]
        return out


# ---- PostgreSQL counters ----

PG_DB_COUNTERS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted", "blks_read",
                  "blks_hit")
# n_dead_tup is a level, not a count: its change is the dead row versions left behind (pruning and
# vacuum not keeping up); every index lookup of such a row walks past them.
PG_TABLE_COUNTERS = ("n_tup_ins", "n_tup_upd", "n_tup_hot_upd", "n_tup_del", "seq_scan", "idx_scan", "n_dead_tup",
                     "heap_blks_hit", "idx_blks_hit")
PG_TABLE_STATS = ("SELECT s.relname, s.n_tup_ins, s.n_tup_upd, s.n_tup_hot_upd, s.n_tup_del, s.seq_scan, "
                  "coalesce(s.idx_scan, 0), s.n_dead_tup, coalesce(io.heap_blks_hit, 0), "
                  "coalesce(io.idx_blks_hit, 0), (SELECT count(*) FROM pg_index i WHERE i.indrelid = s.relid) "
                  "FROM pg_stat_user_tables s JOIN pg_statio_user_tables io ON io.relid = s.relid")
PG_WAL_STATS = ("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint, w.wal_records, w.wal_fpi, "
                "w.wal_sync FROM pg_stat_wal w")


def meter_engine(url: sa.URL | str) -> sa.Engine:
    """The meter's statistics reads: one connection kept open for the run (a new backend per
    sample, as NullPool made, cost the measured server a fork and its catalog loads at every window's
    edges and took 0.1-1 s on a busy box); named METER_APP, which the backends' CPU leaves out."""
    return sa.create_engine(normalize_url(str(url)) if isinstance(url, str) else url, pool_size=1, max_overflow=0,
                            pool_timeout=30, connect_args={"application_name": METER_APP})


class DbStats:
    """PostgreSQL's own counters over a measurement: per database (label → database name)
    pg_stat_database (transactions committed/rolled back, rows inserted/updated/deleted,
    blocks), pg_stat_user_tables per table (rows, HOT updates, scans, with the table's index
    count), and the WAL the whole server wrote (insert position; pg_stat_wal's records,
    full-page images and flushes to disk: fewer flushes than commits is PostgreSQL's own group
    commit, one flush covering the commits queued behind it). Backends report table and
    transaction counts when a transaction ends, at most about once a second, so a 10 s window
    is good to a few per cent; the WAL figure includes whatever else runs on the server."""

    def __init__(self, admin: sa.Engine, admin_url: str, databases: dict[str, str]) -> None:
        url = sa.make_url(normalize_url(admin_url))
        self._admin = admin
        self._dbs = {label: meter_engine(url.set(database=name)) for label, name in databases.items()}
        self._before: dict[str, dict[str, float]] = {}
        self.delta: dict[str, dict[str, float]] = {}
        self.indexes: dict[str, int] = {}

    def _sample(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for label, engine in self._dbs.items():
            with engine.connect() as conn:
                row = conn.execute(sa.text(f"SELECT {', '.join(PG_DB_COUNTERS)} FROM pg_stat_database "
                                           "WHERE datname = current_database()")).one()
                out[label] = {k: float(v) for k, v in zip(PG_DB_COUNTERS, row, strict=True)}
                for r in conn.execute(sa.text(PG_TABLE_STATS)):
                    key = f"{label}.{r[0]}"
                    out[key] = {k: float(v) for k, v in zip(PG_TABLE_COUNTERS, r[1:10], strict=True)}
                    self.indexes[key] = int(r[10])
        with self._admin.connect() as conn:
            wal = conn.execute(sa.text(PG_WAL_STATS)).one()
        out["wal"] = {"bytes": float(wal[0]), "records": float(wal[1]), "fpi": float(wal[2]), "syncs": float(wal[3])}
        return out

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> None:
        after = self._sample()
        self.delta = {key: {k: after[key][k] - v for k, v in before.items()}
                      for key, before in self._before.items() if key in after}

    def dispose(self) -> None:
        for engine in self._dbs.values():
            engine.dispose()


# ---- what the backends wait on ----

ON_CPU = "CPU"
IDLE_IN_TRANSACTION = "idle in transaction"
# psycopg's own placeholders, sent as one prepared statement: through SQLAlchemy, 50 reads a second took
# the sampler and its backend about 2 % of a 2-core box
PG_WAITS = ("SELECT datname, coalesce(wait_event_type || ':' || wait_event, %(cpu)s), state FROM pg_stat_activity "
            "WHERE datname = ANY(%(d)s) AND application_name <> %(me)s AND pid <> pg_backend_pid() "
            "AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')")


@dataclass
class WaitCounts:
    """Backends by '<label>:<wait>' over a window's samples: `total` summed over the samples, `peak` the
    most at one sample. <wait> is PostgreSQL's wait_event_type:wait_event (LWLock:WALWrite, IO:WALSync,
    Lock:transactionid, ...), CPU for an active backend waiting for nothing, or "idle in transaction"."""
    samples: int = 0
    total: Counter[str] = field(default_factory=Counter)
    peak: dict[str, int] = field(default_factory=dict)

    def add(self, seen: Counter[str]) -> None:
        self.samples += 1
        self.total.update(seen)
        for key, n in seen.items():
            self.peak[key] = max(self.peak.get(key, 0), n)

    def summary(self) -> dict[str, dict[str, float]]:
        """'<label>:<wait>' → {"mean": backends per sample, "peak": most at one sample}, by mean, largest first."""
        if not self.samples:
            return {}
        return {key: {"mean": round(n / self.samples, 3), "peak": self.peak[key]}
                for key, n in self.total.most_common()}


class WaitSampler:
    """Samples the wait events of the backends serving the meter's databases every `interval_s`, on a
    thread of the sampler process and a connection of its own, between `start` and `stop`. A read that
    fails or outlasts WAIT_READ_TIMEOUT_MS ends the sampling and fails the measurement at `stop`."""

    def __init__(self, admin_url: str, labels: dict[str, str], interval_s: float) -> None:
        self._engine = meter_engine(admin_url)
        self._labels = labels  # database name → label
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts = WaitCounts()
        self._error: BaseException | None = None

    def _sample(self, conn: psycopg.Connection[Any]) -> Counter[str]:
        rows = conn.execute(PG_WAITS, {"cpu": ON_CPU, "d": list(self._labels), "me": METER_APP}, prepare=True)
        return Counter(f"{self._labels[db]}:{IDLE_IN_TRANSACTION if state != 'active' else wait}"
                       for db, wait, state in rows)

    def _run(self) -> None:
        try:
            raw = self._engine.raw_connection()
            try:
                conn = raw.driver_connection
                assert isinstance(conn, psycopg.Connection), "the wait sampler reads PostgreSQL through psycopg"
                conn.autocommit = True  # pg_stat_activity is read once per transaction: each read its own
                conn.execute(f"SET statement_timeout = {WAIT_READ_TIMEOUT_MS}")
                while not self._stop.is_set() and self._counts.samples < WAIT_SAMPLES_MAX:
                    self._counts.add(self._sample(conn))
                    self._stop.wait(self._interval_s)
            finally:
                raw.close()
        except Exception as exc:  # noqa: BLE001 (reported at stop, which fails the measurement)
            self._error = exc

    @property
    def samples(self) -> int:
        """Samples taken since the last start."""
        return self._counts.samples

    def _end(self) -> bool:
        """Stops the sampling thread, if any; False if it did not stop within its bound."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(WAIT_READ_TIMEOUT_MS / 1000 + 5)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def start(self) -> None:
        if not self._end():  # the previous window's (the sampler's opening start has no stop)
            raise MeterFailed("the wait sampler did not stop within its bound")
        self._stop.clear()
        self._counts, self._error = WaitCounts(), None
        self._thread = threading.Thread(target=self._run, name="wait-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> WaitCounts:
        if not self._end():
            raise MeterFailed("the wait sampler did not stop within its bound")
        if self._error is not None:
            raise MeterFailed(f"the wait sampler failed: {type(self._error).__name__}: {self._error}")
        return self._counts

    def dispose(self) -> None:
        self._end()
        self._engine.dispose()


class LocalMeter:
    """The sampling itself, in the process that runs it (the sampler): CPU per group and per role
    between `start` and `stop` (processes present at both), and DbStats at the same instants."""

    def __init__(self, spec: MeterSpec) -> None:
        self.spec = spec
        self._admin = meter_engine(spec.pg_admin_url) if spec.pg_admin_url else None
        self._labels = dict((name, label) for label, name in spec.pg_databases)
        self._stats = (DbStats(self._admin, spec.pg_admin_url, dict(spec.pg_databases))
                       if spec.stats and self._admin is not None else None)
        self._waits = (WaitSampler(spec.pg_admin_url, self._labels, spec.wait_interval_s)
                       if spec.wait_interval_s > 0 and spec.pg_admin_url else None)
        self._before: dict[str, dict[int, float]] = {}
        self._roles_before: dict[str, dict[int, float]] = {}

    def _pg_pids(self, kind: str) -> list[int]:
        assert self._admin is not None, "a PostgreSQL group needs the meter's pg_admin_url"
        with self._admin.connect() as conn:
            if kind == "backends":
                rows = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = ANY(:d) "
                                            "AND application_name <> :me"), {"d": list(self._labels), "me": METER_APP})
            else:
                rows = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE backend_type = ANY(:t)"),
                                    {"t": list(PG_AUX_TYPES)})
            return [int(r[0]) for r in rows]

    def _group_pids(self, g: CpuGroup) -> list[int]:
        return [*g.pids, *(pids_by_comm(g.comm) if g.comm else []), *(self._pg_pids(g.pg) if g.pg else [])]

    def _roles(self) -> dict[str, list[int]]:
        """The backends grouped as '<label>:<application_name>' ('mis:mis_adapter', 'bridge:bridge/journal-writer',
        ...). A backend that lives less than a measurement (a health probe's connection) is not counted."""
        if not self.spec.roles or self._admin is None:
            return {}
        out: dict[str, list[int]] = {}
        with self._admin.connect() as conn:
            rows = conn.execute(sa.text("SELECT pid, datname, application_name FROM pg_stat_activity "
                                        "WHERE datname = ANY(:d) AND application_name <> :me"),
                                {"d": list(self._labels), "me": METER_APP})
            for pid, datname, app in rows:
                out.setdefault(f"{self._labels[datname]}:{app or '(unnamed)'}", []).append(int(pid))
        return out

    @staticmethod
    def _cpu(groups: dict[str, list[int]]) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pids in groups.items():
            values = {pid: process_cpu_s(pid) for pid in pids}
            out[name] = {pid: v for pid, v in values.items() if v is not None}
        return out

    @staticmethod
    def _used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
        return {name: sum(after[name][pid] - v for pid, v in b.items() if pid in after.get(name, {}))
                for name, b in before.items()}

    def start(self, waits: bool = True) -> None:
        """`waits` False: no wait sampling until the next start (the sampler's opening start, which
        opens the connections: the pays' meter is opened before the echo is measured)."""
        self._before = self._cpu({g.name: self._group_pids(g) for g in self.spec.groups})
        self._roles_before = self._cpu(self._roles())
        if self._stats:
            self._stats.start()
        if self._waits and waits:
            self._waits.start()

    def stop(self) -> Reading:
        waits = self._waits.stop() if self._waits else None
        after = self._cpu({g.name: self._group_pids(g) for g in self.spec.groups})
        roles = self._used(self._roles_before, self._cpu(self._roles())) if self.spec.roles else {}
        if self._stats:
            self._stats.stop()
        return Reading(self._used(self._before, after), roles, self._stats.delta if self._stats else {},
                       dict(self._stats.indexes) if self._stats else {}, waits)

    def dispose(self) -> None:
        if self._waits:
            self._waits.dispose()
        if self._stats:
            self._stats.dispose()
        if self._admin is not None:
            self._admin.dispose()


def _sampler_main(conn: Connection, spec: MeterSpec) -> None:
    """The sampler process: answers "start", "stop" (with the Reading) and "exit" until its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the benchmark ends us
    meter = LocalMeter(spec)
    try:
        try:
            meter.start(waits=False)  # open the statistics connections now, not at the first window's edge
            conn.send(("ready", os.getpid()))
        except Exception as exc:  # noqa: BLE001 (reported to the benchmark, which fails loudly)
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        while True:
            try:
                what = conn.recv()
            except (EOFError, OSError):
                return  # the benchmark is gone
            try:
                if what == "start":
                    meter.start()
                    conn.send(("ok", None))
                elif what == "stop":
                    conn.send(("ok", meter.stop()))
                elif what == "exit":
                    meter.dispose()
                    conn.send(("ok", None))
                    return
                else:
                    conn.send(("error", f"unknown request {what!r}"))
            except Exception as exc:  # noqa: BLE001 (reported to the benchmark, which fails loudly)
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        meter.dispose()


class CpuMeter:
    """A meter sampled by a process of its own (`open` spawns it, `close` ends it; also a context manager).
    `start`/`stop` block the calling thread (not the GIL: it waits in a poll) until the sampler has taken
    its sample, at most `answer_timeout_s`; `stop` returns CPU seconds per group, and leaves the
    measurement's Reading (roles, database counters) in `reading`."""

    def __init__(self, spec: MeterSpec, answer_timeout_s: float = ANSWER_TIMEOUT_S,
                 ready_timeout_s: float = SAMPLER_READY_TIMEOUT_S) -> None:
        self.spec = spec
        self.answer_timeout_s = answer_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.reading = Reading()
        self.sampler_pid: int | None = None
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None

    def open(self) -> CpuMeter:
        ctx = multiprocessing.get_context("spawn")
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_sampler_main, args=(theirs, self.spec), name="bench-ratio-meter", daemon=True)
        proc.start()
        theirs.close()
        self._conn, self._proc = mine, proc
        pid = self._answer("ready", self.ready_timeout_s)
        assert isinstance(pid, int)
        self.sampler_pid = pid
        return self

    def __enter__(self) -> CpuMeter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _answer(self, what: str, timeout_s: float) -> object:
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            raise MeterFailed(f"the meter's sampler is not running (asked {what!r})")
        try:
            if not conn.poll(timeout_s):
                self._kill()
                raise MeterFailed(f"the meter's sampler (pid {proc.pid}) did not answer {what!r} within {timeout_s:g} s")
            kind, value = conn.recv()
        except (EOFError, OSError) as exc:
            self._kill()
            raise MeterFailed(f"the meter's sampler (pid {proc.pid}) is gone (exit code {proc.exitcode}) "
                              f"while asked {what!r}") from exc
        if kind == "error":
            raise MeterFailed(f"the meter's sampler failed at {what!r}: {value}")
        return value

    def _ask(self, what: str) -> object:
        if self._conn is None:
            raise MeterFailed(f"the meter's sampler is not running (asked {what!r})")
        try:
            self._conn.send(what)
        except (BrokenPipeError, OSError) as exc:
            self._kill()
            raise MeterFailed(f"the meter's sampler is gone while asked {what!r}") from exc
        return self._answer(what, self.answer_timeout_s)

    def start(self) -> None:
        self.reading = Reading()
        self._ask("start")

    def stop(self) -> dict[str, float]:
        reading = self._ask("stop")
        assert isinstance(reading, Reading)
        self.reading = reading
        return dict(reading.cpu_s)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(EXIT_TIMEOUT_S)
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def close(self) -> None:
        """Ends the sampler (its statistics connections closed first), within bounded waits."""
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            with contextlib.suppress(MeterFailed):
                self._ask("exit")
            self._proc.join(EXIT_TIMEOUT_S)
        self._kill()
        self._proc = None
