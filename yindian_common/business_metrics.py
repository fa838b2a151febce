"""Every `yindian_*` business metric, defined once, and the small functions
the money paths call to move them.

Labels are bounded by construction: bank ids (at most BANK_LABELS_MAX
distinct values, then "OTHER"), channels, outcomes and branch codes from
fixed sets. Never pass an account number, serial, name or free text.

Figures that can be read from a database at scrape time (arrears, SUSPECT
payments, queue depths, feed backlog) are exported by the processes'
collectors (mis_adapter/metrics_collector.py, bridge/metrics_collector.py)
rather than counted here; `PoolCollector` and `instrument_engine` give
every process its connection-pool use and database error counts.

Call-site contract (who calls what):
    record_payment(bank, channel, amount_fen)      a payment newly POSTED (not a replay)
    record_payment_replay(bank)                    an idempotent replay answered from the stored result
    record_cancel(bank, outcome, amount_fen)       a cancel applied: REVERSED or ORIGINAL_NOT_FOUND
    record_suspect_payment(bank)                   the bridge journaled a pay SUSPECT (outcome unknown)
    record_reversal(bank, outcome)                 the bridge resolved or retried a SUSPECT pay
    record_feed_sent(bank, notices)                bill notices written to a feed stream
    record_feed_acknowledged(bank, notices)        notices the cursor advanced over
    record_debit_result(bank, outcome)             a DebitResult received (DEBITED, INSUFFICIENT_FUNDS, ...)
    set_feed_unacknowledged(bank, notices)         the stream's current window of unacknowledged notices
    set_feed_stream_active(bank, active)           a bank's feed stream opened / closed
    record_reconcile_records(bank, outcome, records, amount_fen)   per outcome of one reconciliation
    record_reconciliation(bank, result)            COMPLETED, REPLAYED (stored result) or FAILED
    set_control_divergence(bank, fen, count)       continuous reconciliation: a persisting divergence (0: agree)
    record_control_exchange(bank, result)          one exchange of control totals: AGREE, WATCHING, FLAGGED, FAILED
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.engine import Engine

from yindian_common import metrics as _grpc_metrics  # noqa: F401  (turns off the _created series)
from yindian_common.db import bound_mysql_links, link_bound_args, role_name

log = logging.getLogger("yindian.metrics")

__all__ = [
    "BANK_LABELS_MAX", "DEFAULT_COLLECTOR_LIMITS", "CollectorLimits", "DbGaugeCollector", "GaugeSpec", "PoolCollector", "Readings", "db_label", "initialize_bridge_bank", "initialize_utility_bank", "instrument_engine", "record_cancel", "record_db_error",
    "record_debit_result", "record_feed_acknowledged", "record_feed_sent", "record_payment",
    "record_payment_replay", "record_control_exchange", "record_reconcile_records", "record_reconciliation", "record_reversal",
    "read_only_engine", "record_suspect_payment", "register_collectors", "set_control_divergence", "set_feed_stream_active", "set_feed_unacknowledged",
]

# Bank ids come from certificates (or loopback metadata): cap the label set anyway.
BANK_LABELS_MAX = 64
OTHER = "OTHER"

CHANNELS = frozenset({"COUNTER", "AUTO_DEBIT", "ATM", "ONLINE", "UNSPECIFIED"})
CANCEL_OUTCOMES = frozenset({"REVERSED", "ORIGINAL_NOT_FOUND"})
# How the bridge settles a SUSPECT pay: the utility had POSTED it, a cancel REVERSED it, a cancel
# left a tombstone (ORIGINAL_NOT_FOUND), or an attempt failed and is retried (RETRY).
REVERSAL_OUTCOMES = frozenset({"POSTED", "REVERSED", "ORIGINAL_NOT_FOUND", "RETRY"})
DEBIT_OUTCOMES = frozenset({"DEBITED", "INSUFFICIENT_FUNDS", "NO_AGREEMENT", "REJECTED", "SETTLED_ELSEWHERE"})
RECONCILE_OUTCOMES = frozenset({"MATCHED", "BANK_ONLY", "UTILITY_ONLY", "MISMATCH"})
RECONCILIATION_RESULTS = frozenset({"COMPLETED", "REPLAYED", "FAILED"})
CONTROL_EXCHANGE_RESULTS = frozenset({"AGREE", "WATCHING", "FLAGGED", "RECONCILED", "SKIPPED", "FAILED"})
DB_ERRORS = frozenset({"OperationalError", "IntegrityError", "DataError", "ProgrammingError", "InterfaceError",
                       "InternalError", "NotSupportedError", "DatabaseError", "TimeoutError"})

PAYMENTS = Counter("yindian_payments", "Payments newly posted, by bank and channel.", ["bank", "channel"])
PAYMENTS_FEN = Counter("yindian_payments_fen", "Fen of payments newly posted, by bank and channel.",
                       ["bank", "channel"])
PAYMENT_REPLAYS = Counter("yindian_payment_replays", "Pay requests answered from the stored result (replays).",
                          ["bank"])
CANCELS = Counter("yindian_cancels", "Cancels (冲正) applied, by bank and outcome.", ["bank", "outcome"])
CANCELS_FEN = Counter("yindian_cancels_fen", "Fen of cancels applied, by bank and outcome.", ["bank", "outcome"])
SUSPECT_PAYMENTS = Counter("yindian_payments_in_doubt", "Pays the bridge journaled SUSPECT (outcome unknown).",
                           ["bank"])
REVERSALS = Counter("yindian_reversals", "SUSPECT pays resolved or retried by the bridge, by outcome.",
                    ["bank", "outcome"])
FEED_SENT = Counter("yindian_feed_notices_sent", "Bill notices sent on the feed.", ["bank"])
FEED_ACKED = Counter("yindian_feed_notices_acknowledged", "Bill notices acknowledged (cursor advanced).", ["bank"])
FEED_DEBIT_RESULTS = Counter("yindian_feed_debit_results", "Debit results received on the feed, by outcome.",
                             ["bank", "outcome"])
FEED_UNACKED = Gauge("yindian_feed_unacknowledged_notices", "Notices sent and not yet acknowledged.", ["bank"])
FEED_STREAMS = Gauge("yindian_feed_streams_active", "Open bill-feed streams.", ["bank"])
RECONCILE_RECORDS = Counter("yindian_reconcile_records", "Reconciled records, by outcome.", ["bank", "outcome"])
RECONCILE_FEN = Counter("yindian_reconcile_fen", "Fen of reconciled records, by outcome.", ["bank", "outcome"])
RECONCILIATIONS = Counter("yindian_reconciliations", "Reconciliations run, by result.", ["bank", "result"])
CONTROL_DIVERGENCE_FEN = Gauge("yindian_control_total_divergence_fen",
                               "Continuous reconciliation: fen by which this side's control totals of the open "
                               "settlement date differ from the other side's, once the difference has persisted "
                               "past the in-doubt window (0 in agreement).", ["bank"])
CONTROL_DIVERGENCE_COUNT = Gauge("yindian_control_total_divergence_pays",
                                 "Continuous reconciliation: pays by which the control totals differ, once the "
                                 "difference has persisted past the in-doubt window (0 in agreement).", ["bank"])
CONTROL_EXCHANGES = Counter("yindian_control_total_exchanges", "Exchanges of control totals, by result.",
                            ["bank", "result"])
DB_ERRORS_TOTAL = Counter("yindian_db_errors", "Database errors, by database and error class.", ["db", "error"])

_banks_lock = threading.Lock()
_banks_seen: set[str] = set()


def _bank(bank: str) -> str:
    if bank in _banks_seen:
        return bank
    with _banks_lock:
        if len(_banks_seen) >= BANK_LABELS_MAX or not bank:
            return OTHER
        _banks_seen.add(bank)
    return bank


def _member(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else OTHER


def _channel(channel: str) -> str:
    return _member(channel.removeprefix("CHANNEL_"), CHANNELS)


# Label children of the per-pay counters, resolved once per (bank, channel): `labels()` takes a lock and
# builds the key on every call. Bounded: banks by BANK_LABELS_MAX (+ OTHER), channels by CHANNELS (+ OTHER).
PAYMENT_CHILDREN_MAX = (BANK_LABELS_MAX + 1) * (len(CHANNELS) + 1)
_payment_children: dict[tuple[str, str], tuple[Any, Any]] = {}


def record_payment(bank: str, channel: str, amount_fen: int) -> None:
    """A payment newly posted; `channel` is COUNTER, AUTO_DEBIT, ATM or ONLINE (a CHANNEL_ prefix is dropped)."""
    key = (bank, channel)
    children = _payment_children.get(key)
    if children is None:
        labels = (_bank(bank), _channel(channel))
        children = (PAYMENTS.labels(*labels), PAYMENTS_FEN.labels(*labels))
        if len(_payment_children) < PAYMENT_CHILDREN_MAX:
            _payment_children[key] = children
    children[0].inc()
    children[1].inc(amount_fen)


def record_payment_replay(bank: str) -> None:
    PAYMENT_REPLAYS.labels(_bank(bank)).inc()


def record_cancel(bank: str, outcome: str, amount_fen: int) -> None:
    labels = (_bank(bank), _member(outcome.removeprefix("CANCEL_OUTCOME_"), CANCEL_OUTCOMES))
    CANCELS.labels(*labels).inc()
    CANCELS_FEN.labels(*labels).inc(amount_fen)


def record_suspect_payment(bank: str) -> None:
    SUSPECT_PAYMENTS.labels(_bank(bank)).inc()


def record_reversal(bank: str, outcome: str) -> None:
    REVERSALS.labels(_bank(bank), _member(outcome, REVERSAL_OUTCOMES)).inc()


def record_feed_sent(bank: str, notices: int = 1) -> None:
    FEED_SENT.labels(_bank(bank)).inc(notices)


def record_feed_acknowledged(bank: str, notices: int) -> None:
    FEED_ACKED.labels(_bank(bank)).inc(notices)


def record_debit_result(bank: str, outcome: str, results: int = 1) -> None:
    FEED_DEBIT_RESULTS.labels(_bank(bank), _member(outcome.removeprefix("DEBIT_OUTCOME_"), DEBIT_OUTCOMES)).inc(results)


def set_feed_unacknowledged(bank: str, notices: int) -> None:
    FEED_UNACKED.labels(_bank(bank)).set(notices)


def set_feed_stream_active(bank: str, active: bool) -> None:
    FEED_STREAMS.labels(_bank(bank)).set(1 if active else 0)


def record_reconcile_records(bank: str, outcome: str, records: int, amount_fen: int) -> None:
    labels = (_bank(bank), _member(outcome.removeprefix("RECONCILE_OUTCOME_"), RECONCILE_OUTCOMES))
    RECONCILE_RECORDS.labels(*labels).inc(records)
    RECONCILE_FEN.labels(*labels).inc(amount_fen)


def record_reconciliation(bank: str, result: str) -> None:
    RECONCILIATIONS.labels(_bank(bank), _member(result, RECONCILIATION_RESULTS)).inc()


_initialized_lock = threading.Lock()
_initialized: set[tuple[str, str]] = set()


def set_control_divergence(bank: str, fen: int, count: int) -> None:
    bank = _bank(bank)
    CONTROL_DIVERGENCE_FEN.labels(bank).set(fen)
    CONTROL_DIVERGENCE_COUNT.labels(bank).set(count)


def record_control_exchange(bank: str, result: str) -> None:
    CONTROL_EXCHANGES.labels(_bank(bank), _member(result, CONTROL_EXCHANGE_RESULTS)).inc()


def _initialize_control_totals(bank: str) -> None:
    CONTROL_DIVERGENCE_FEN.labels(bank)
    CONTROL_DIVERGENCE_COUNT.labels(bank)
    for result in CONTROL_EXCHANGE_RESULTS:
        CONTROL_EXCHANGES.labels(bank, result)


def _initialize_once(side: str, bank: str) -> bool:
    with _initialized_lock:
        if (side, bank) in _initialized:
            return False
        _initialized.add((side, bank))
        return True


def initialize_utility_bank(bank: str) -> None:
    """Creates the utility side's per-bank series at zero, so that dashboards' rates exist (as 0) before
    the first payment, cancel, feed notice or reconciliation. Idempotent; the collector calls it per bank."""
    bank = _bank(bank)
    if not _initialize_once("utility", bank):
        return
    for channel in ("COUNTER", "AUTO_DEBIT", "ATM", "ONLINE"):
        PAYMENTS.labels(bank, channel)
        PAYMENTS_FEN.labels(bank, channel)
    PAYMENT_REPLAYS.labels(bank)
    for outcome in CANCEL_OUTCOMES:
        CANCELS.labels(bank, outcome)
        CANCELS_FEN.labels(bank, outcome)
    FEED_SENT.labels(bank)
    FEED_ACKED.labels(bank)
    FEED_UNACKED.labels(bank)
    FEED_STREAMS.labels(bank)
    for outcome in ("DEBITED", "INSUFFICIENT_FUNDS"):
        FEED_DEBIT_RESULTS.labels(bank, outcome)
    for outcome in RECONCILE_OUTCOMES:
        RECONCILE_RECORDS.labels(bank, outcome)
        RECONCILE_FEN.labels(bank, outcome)
    for result in RECONCILIATION_RESULTS:
        RECONCILIATIONS.labels(bank, result)
    _initialize_control_totals(bank)


def initialize_bridge_bank(bank: str) -> None:
    """Creates the bridge's per-bank series (in-doubt pays, reversals) at zero. Idempotent."""
    bank = _bank(bank)
    if not _initialize_once("bridge", bank):
        return
    SUSPECT_PAYMENTS.labels(bank)
    for outcome in REVERSAL_OUTCOMES:
        REVERSALS.labels(bank, outcome)
    _initialize_control_totals(bank)


# ---- databases ------------------------------------------------------------------------------------------------


def db_label(engine: Engine) -> str:
    """A short, bounded name for an engine: the SQLite file's stem or the server database's name."""
    url = engine.url
    name = url.database or url.get_backend_name()
    if url.get_backend_name() == "sqlite":
        name = name.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0] or "memory"
    return name[:32]


def record_db_error(db: str, exc: BaseException) -> None:
    """Counts a database error by its SQLAlchemy class (bounded), e.g. from an `except` that translates it."""
    DB_ERRORS_TOTAL.labels(db, _member(type(exc).__name__, DB_ERRORS)).inc()


_instrumented: weakref.WeakSet[Engine] = weakref.WeakSet()


def instrument_engine(engine: Engine, db: str | None = None) -> None:
    """Counts every error the engine raises (yindian_db_errors_total{db, error}); idempotent per engine."""
    if engine in _instrumented:
        return
    _instrumented.add(engine)
    name = db or db_label(engine)

    def on_error(ctx: sa.engine.ExceptionContext) -> None:
        exc: BaseException = ctx.sqlalchemy_exception or ctx.original_exception
        record_db_error(name, exc)

    event.listen(engine, "handle_error", on_error)


class PoolCollector(Collector):
    """Connection-pool use of the process's engines, read at scrape time (no queries)."""

    def __init__(self, engines: Iterable[Engine]) -> None:
        self._engines = [(db_label(e), e) for e in engines]

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("yindian_db_pool_checked_out_connections",
                                  "Connections currently checked out of the pool.", labels=["db"]),
                GaugeMetricFamily("yindian_db_pool_size_connections", "Configured pool size (without overflow).",
                                  labels=["db"]))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        checked_out, size = self._families()
        for name, engine in self._engines:
            pool: Any = engine.pool
            if hasattr(pool, "checkedout"):
                checked_out.add_metric([name], float(pool.checkedout()))
            if hasattr(pool, "size"):
                size.add_metric([name], float(pool.size()))
        yield checked_out
        yield size


# ---- gauges read from a database at scrape time -------------------------------------------------------------

COLLECTOR_ERRORS = Counter("yindian_collector_errors", "Scrape-time database reads that failed or timed out.",
                           ["collector"])
COLLECTOR_SECONDS = Gauge("yindian_collector_query_seconds", "Duration of the last scrape-time database read.",
                          ["collector"])


@dataclass(frozen=True)
class CollectorLimits:
    # Scrapes within refresh_s of the last read get its figures: the database sees one read per interval
    # however many Prometheus servers scrape.
    refresh_s: float = 15.0
    # Each read runs on its own one-connection engine with this statement timeout, so a slow database
    # delays a scrape by at most this long and never takes a connection from the serving pool.
    query_timeout_s: float = 2.0


DEFAULT_COLLECTOR_LIMITS = CollectorLimits()


@dataclass(frozen=True)
class GaugeSpec:
    name: str
    documentation: str
    labels: tuple[str, ...]
    # How one label set's values from several databases combine: "sum" (counts, fen) or "max" (ages, lags).
    merge: str = "sum"


# family name -> label values -> value
Readings = dict[str, dict[tuple[str, ...], float]]


def read_only_engine(engine: Engine, timeout_s: float, application_name: str = "") -> Engine:
    """A one-connection engine on `engine`'s database whose statements stop after `timeout_s`
    (`application_name`: PostgreSQL's name for its connection, e.g. 'bridge/metrics')."""
    url = engine.url
    backend = url.get_backend_name()
    timeout_ms = max(1, int(timeout_s * 1000))
    common: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_timeout": timeout_s,
                              "poolclass": sa.pool.QueuePool}
    if backend == "sqlite":
        deadline = threading.local()
        eng = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": timeout_s}, **common)

        @event.listens_for(eng, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # plain reads, never BEGIN IMMEDIATE
            dbapi_conn.execute("PRAGMA query_only=1")
            dbapi_conn.set_progress_handler(lambda: int(time.monotonic() > getattr(deadline, "at", 1e18)), 10_000)

        @event.listens_for(eng, "before_cursor_execute")
        def _arm(*_args: Any) -> None:
            deadline.at = time.monotonic() + timeout_s

        return eng
    if backend == "postgresql":
        args: dict[str, Any] = {**link_bound_args("postgresql"), "connect_timeout": max(1, int(timeout_s)),
                                "options": f"-c statement_timeout={timeout_ms} -c default_transaction_read_only=on"}
        if application_name:
            args["application_name"] = application_name
        return sa.create_engine(url, pool_pre_ping=True, connect_args=args, **common)
    eng = sa.create_engine(url, pool_pre_ping=True, connect_args={
        "connect_timeout": max(1, int(timeout_s)), "read_timeout": max(1, int(timeout_s) + 1)}, **common)
    bound_mysql_links(eng)

    @event.listens_for(eng, "connect")
    def _mysql_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("SELECT VERSION()")
            if "mariadb" in str(cur.fetchone()[0]).lower():
                cur.execute(f"SET SESSION max_statement_time = {timeout_s:.3f}")
            else:
                cur.execute(f"SET SESSION max_execution_time = {timeout_ms}")
        finally:
            cur.close()

    return eng


class DbGaugeCollector(Collector):
    """Base of the processes' collectors: gauges computed by one cheap aggregate
    read per database, at most every `refresh_s`, each bounded by a statement
    timeout. A failed read keeps the last figures and counts an error."""

    name = "db"
    specs: tuple[GaugeSpec, ...] = ()

    def __init__(self, engines: Iterable[Engine], limits: CollectorLimits = DEFAULT_COLLECTOR_LIMITS) -> None:
        self.limits = limits
        self._readers = [read_only_engine(e, limits.query_timeout_s, role_name(self.name, "metrics"))
                         for e in engines]
        self._lock = threading.Lock()
        self._last_read_at = -1e18
        self._readings: Readings = {}

    def read(self, conn: sa.Connection) -> Readings:
        """One database's figures; the base sums them over databases. Subclasses override."""
        raise NotImplementedError

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for spec in self.specs:
            yield GaugeMetricFamily(spec.name, spec.documentation, labels=list(spec.labels))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self._refresh_if_due()
        readings = self._readings
        for spec in self.specs:
            fam = GaugeMetricFamily(spec.name, spec.documentation, labels=list(spec.labels))
            for labels, value in sorted(readings.get(spec.name, {}).items()):
                fam.add_metric(list(labels), value)
            yield fam

    def refresh(self) -> None:
        """Reads every database now (tests, and the first scrape)."""
        started = time.monotonic()
        merged: Readings = {}
        take_max = {spec.name for spec in self.specs if spec.merge == "max"}
        try:
            for reader in self._readers:
                with reader.connect() as conn:
                    for family, values in self.read(conn).items():
                        into = merged.setdefault(family, {})
                        for labels, value in values.items():
                            if labels not in into:
                                into[labels] = value
                            elif family in take_max:
                                into[labels] = max(into[labels], value)
                            else:
                                into[labels] += value
        except sa.exc.SQLAlchemyError as exc:
            COLLECTOR_ERRORS.labels(self.name).inc()
            log.warning("event=collector_read_failed collector=%s error=%s", self.name, type(exc).__name__)
            return
        finally:
            COLLECTOR_SECONDS.labels(self.name).set(time.monotonic() - started)
        self._readings = merged

    def _refresh_if_due(self) -> None:
        if time.monotonic() - self._last_read_at < self.limits.refresh_s:
            return
        # A scrape that finds another one reading serves the previous figures instead of queueing.
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._last_read_at = time.monotonic()
            self.refresh()
        finally:
            self._lock.release()

    def close(self) -> None:
        for reader in self._readers:
            reader.dispose()


_registrations_lock = threading.Lock()
# Per registry (weakly: a registry that is gone takes its entries with it, and a new one that
# happens to get the same id() never sees them), the collectors registered under each key.
_registrations: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, list[Collector]]] = \
    weakref.WeakKeyDictionary()


def register_collectors(registry: CollectorRegistry, key: str, collectors: list[Collector]) -> None:
    """Registers a process's collectors under `key`, replacing (and closing) any registered before under
    it, so a server built twice in one process (tests) does not collide on metric names."""
    with _registrations_lock:
        by_key = _registrations.setdefault(registry, {})
        for old in by_key.pop(key, []):
            registry.unregister(old)
            if isinstance(old, DbGaugeCollector):
                old.close()
        for collector in collectors:
            registry.register(collector)
        by_key[key] = collectors
