"""Database engines for the three supported back ends, configured the same
way for every process: SQLite (embedded default, WAL, synchronous=FULL,
BEGIN IMMEDIATE for writers so that concurrent writers queue instead of
failing on lock upgrade), PostgreSQL (psycopg 3) and MariaDB/MySQL (PyMySQL,
READ COMMITTED so that a row read after a lock wait is the committed one).

Every database wait is bounded (issue 9 item 4): each connection starts with
the process's bounds (PostgreSQL lock_timeout and
idle_in_transaction_session_timeout, MariaDB innodb_lock_wait_timeout, SQLite
busy timeout), and a call tightens them to its remaining deadline
(`db_wait_bound`, `bound_waits`; Pay's PostgreSQL statement does it inline).

A database link that stops carrying packets (a cable, a firewall that drops the flow, the
server's host gone) is given up by TCP itself on every connection (`link_bound_args`,
`bound_mysql_links`): a connection attempt within DB_CONNECT_TIMEOUT_S, and an open
connection within DB_LINK_DEAD_S of the last segment it received while it has data the
server has not acknowledged or has gone quiet (TCP keepalive probes). The server-side
bounds above end only waits of a server that still answers; without these, a call waiting
on a dead link held its thread until the kernel gave up retransmitting, 15 minutes or more.

Transactions belong to the caller; nothing here commits on its own."""
from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from yindian_common import db_watch
from yindian_common.errors import Unavailable

SQLITE_BUSY_TIMEOUT_MS = 30_000
POOL_RECYCLE_S = 1_800
# Connection defaults when the caller gives none: a lock wait, and a transaction left idle
# (a frozen process, a stream that stopped sending) before the server ends it.
DB_WAIT_MAX_S = 10.0
DB_IDLE_IN_TX_MAX_S = 120.0
# Time kept back from a call's deadline for the answer to travel back.
DEADLINE_MARGIN_S = 0.1
# A transaction may sit idle between its statements this much longer than it may wait.
IDLE_SLACK_MS = 1_000
# Session-level bounds (SQLite, MariaDB, Pay's kept PostgreSQL connections) change only in steps of
# this, so that a run of calls with similar deadlines sends no statement at all.
WAIT_STEP_MS = 250
# A client-side wait for a call's answer (Pay's kept PostgreSQL connections, pay_pg) ends this long after
# the call's own server-side bound, which ends DEADLINE_MARGIN_S before the caller's deadline: a server that
# can answer has answered by then (a lock or statement timeout: nothing written), and an in-doubt answer
# still leaves before the caller's deadline. It ends the wait on a link that died with the call in flight,
# which TCP gives up only DB_LINK_DEAD_S after its last segment.
ANSWER_SLACK_S = DEADLINE_MARGIN_S / 2
# A session keeps its bound for a call that allows at least that long and less than this many steps
# longer (kept_wait_fits): a bound up to 2 steps (500 ms) shorter than a call allows costs little, and
# absorbs the jitter of queueing before the call. Pays forwarded with a 5 s deadline reach mis_adapter
# with 4.2-4.95 s left at 32 in flight on PostgreSQL (session 14, bench-ratio at load 10-14). Kept
# connections re-sent their bound (besides each one's first call) for 0-147 of 1,800-3,400 pays a run
# when it had to equal the call's own step, 1-6 with 2 steps, and 4 steps saved none more.
WAIT_KEEP_STEPS = 2
# A dead database link (see the module's text): a connection attempt, and an open connection
# from the last segment it received. Keepalive probes start after DB_KEEPALIVE_IDLE_S of
# silence (a healthy server's kernel answers each one at once, however long its statement
# runs), one a second; TCP_USER_TIMEOUT then ends the connection once nothing has been
# acknowledged for DB_LINK_DEAD_S, probes included.
DB_CONNECT_TIMEOUT_S = 5
DB_LINK_DEAD_S = 10
DB_KEEPALIVE_IDLE_S = 5
DB_KEEPALIVE_INTERVAL_S = 1
DB_KEEPALIVE_COUNT = DB_LINK_DEAD_S - DB_KEEPALIVE_IDLE_S  # where TCP_USER_TIMEOUT is not honoured
# application_name of a process's connections for a role: "<process>/<role>" (role_name).
ROLE_SEP = "/"


class _WaitSettings(Protocol):
    @property
    def db_wait_max_s(self) -> float: ...


@dataclass(frozen=True)
class WaitBound:
    """How long this call's statements may wait on the database, in milliseconds, and when its answers are
    due (time.monotonic(); 0: no deadline): ANSWER_SLACK_S after the waits' end, less the watch's period
    (db_watch cuts a round trip still waiting then, before the caller's deadline)."""
    wait_ms: int
    idle_ms: int
    answer_by: float = 0.0


def db_wait_bound(settings: _WaitSettings, time_left_s: float | None) -> WaitBound:
    """The bound for a call with `time_left_s` to its deadline (None: no deadline).
    A call whose deadline has passed does no work: UNAVAILABLE, nothing written."""
    limit_s = settings.db_wait_max_s if time_left_s is None else min(settings.db_wait_max_s,
                                                                     _work_left_s(time_left_s))
    wait_ms = max(1, int(limit_s * 1000))
    due = 0.0 if time_left_s is None else answer_due(wait_ms)
    return WaitBound(wait_ms, wait_ms + IDLE_SLACK_MS, due)


def deadline_due(time_left_s: float | None) -> float:
    """When the round trips of a call with `time_left_s` to its deadline are due (time.monotonic(); 0: no
    deadline, not watched): as answer_due, for waits that may last until the caller's last DEADLINE_MARGIN_S.
    The caller's deadline, not the call's longest single wait (db_wait_bound): a call of several statements,
    or a stream read page by page, may rightly outlast db_wait_max_s, each statement's own server-side bound
    ending its waits. A call whose deadline has already passed does no work (UNAVAILABLE, nothing written)."""
    return 0.0 if time_left_s is None else answer_due(int(_work_left_s(time_left_s) * 1000))


def _work_left_s(time_left_s: float) -> float:
    """The time a call with `time_left_s` to its deadline has for its work (DEADLINE_MARGIN_S kept for its
    answer); UNAVAILABLE, nothing written, when none is left."""
    left_s = time_left_s - DEADLINE_MARGIN_S
    if left_s <= 0:
        raise Unavailable("the call's deadline passed before its work started; nothing was written",
                          reason="DEADLINE_PASSED")
    return left_s


def watched_until_deadline(time_left_s: float | None) -> db_watch.calls_due:
    """`with` it around a whole call's handler: every pooled round trip of the call is cut when still
    unanswered shortly before the caller's deadline (db_watch, deadline_due; `time_left_s` None: not
    watched), so the call ends UNAVAILABLE instead of holding its thread until TCP gives up on a dead link
    (DB_LINK_DEAD_S). A call whose deadline has already passed does no work."""
    return db_watch.calls_due(deadline_due(time_left_s))


def answer_due(wait_ms: int) -> float:
    """When the answers of a call whose waits are bounded by `wait_ms` from now are due (time.monotonic()):
    after its server-side bounds, and cut by db_watch (WATCH_PERIOD_S later at most) still before the
    caller's deadline (ANSWER_SLACK_S after the bounds)."""
    return time.monotonic() + wait_ms / 1000 + ANSWER_SLACK_S - db_watch.WATCH_PERIOD_S


def stepped_wait_ms(ms: int) -> int:
    """A wait bound rounded down to WAIT_STEP_MS (never longer than `ms`): the bound a call sends to a
    session whose kept one does not fit it (kept_wait_fits)."""
    return ms if ms < WAIT_STEP_MS else ms - ms % WAIT_STEP_MS


def kept_wait_fits(kept_ms: int | None, wait_ms: int) -> bool:
    """Whether a session bound of `kept_ms` (None: unknown) serves a call allowing `wait_ms`: never longer
    than the call allows, and shorter by less than WAIT_KEEP_STEPS steps (a bound below one step only when
    equal). Else the call sends its own, stepped_wait_ms(wait_ms)."""
    if kept_ms is None or kept_ms > wait_ms:
        return False
    return kept_ms == wait_ms or (kept_ms >= WAIT_STEP_MS and wait_ms - kept_ms < WAIT_KEEP_STEPS * WAIT_STEP_MS)


def bound_waits(conn: Connection, bound: WaitBound) -> None:
    """Bounds the waits of the transaction just begun on `conn`. PostgreSQL: SET LOCAL
    (set_config) of lock, statement and idle timeouts; MariaDB and SQLite: the
    session's lock wait, only when the one it has does not fit (kept_wait_fits)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.exec_driver_sql(_PG_BOUND, {"wait_ms": str(bound.wait_ms), "idle_ms": str(bound.idle_ms)})
        return
    info = conn.connection.info
    default_ms = info.get("wait_default_ms")
    allowed_ms = bound.wait_ms if default_ms is None else min(bound.wait_ms, default_ms)
    if kept_wait_fits(info.get("wait_ms", default_ms), allowed_ms):
        return
    ms = stepped_wait_ms(bound.wait_ms)
    if default_ms is not None:
        ms = min(ms, default_ms)
    # On the driver: through SQLAlchemy, SQLite would first send BEGIN IMMEDIATE (and wait).
    _set_session_wait(conn.connection.driver_connection, dialect, ms, default_ms)
    info["wait_ms"] = ms


def _set_session_wait(driver: Any, dialect: str, ms: int | None, default_ms: int | None) -> None:
    """Bounds the session's lock waits (MariaDB: and statements) to `ms`; `ms == default_ms` puts
    the engine's defaults back (MariaDB: no statement bound)."""
    if dialect == "sqlite":
        driver.execute(f"PRAGMA busy_timeout = {int(ms if ms is not None else SQLITE_BUSY_TIMEOUT_MS)}")
        return
    if ms is None or ms == default_ms:
        lock_s = "DEFAULT" if default_ms is None else str(max(1, math.ceil(default_ms / 1000)))
        sql = f"SET SESSION innodb_lock_wait_timeout = {lock_s}, max_statement_time = DEFAULT"
    else:
        sql = (f"SET SESSION innodb_lock_wait_timeout = {max(1, math.ceil(ms / 1000))}, "
               f"max_statement_time = {ms / 1000:.3f}")
    cur = driver.cursor()
    try:
        cur.execute(sql)
    finally:
        cur.close()


def _session_wait_defaults(engine: Engine, default_ms: int | None) -> None:
    """Every connection starts at the engine's default bound, and a connection tightened by
    `bound_waits` goes back to the pool with it, so that its next user (a reconciliation, a
    report) is not bound by an old call's deadline."""
    dialect = engine.dialect.name

    @event.listens_for(engine, "connect")
    def _on_connect(_dbapi_conn: Any, record: Any) -> None:
        record.info["wait_default_ms"] = default_ms

    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_conn: Any, record: Any) -> None:
        if dbapi_conn is None or record.info.get("wait_ms", default_ms) == default_ms:
            return
        try:
            _set_session_wait(dbapi_conn, dialect, default_ms, default_ms)
            record.info["wait_ms"] = default_ms
        except engine.dialect.loaded_dbapi.Error:
            record.invalidate()  # a connection we cannot reset is not reused


_PG_BOUND = ("SELECT set_config('lock_timeout', %(wait_ms)s, true), "
             "set_config('statement_timeout', %(wait_ms)s, true), "
             "set_config('idle_in_transaction_session_timeout', %(idle_ms)s, true)")


def normalize_url(url: str) -> str:
    """Accepts the plain scheme names and picks our drivers."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("mysql://") or url.startswith("mariadb://"):
        return "mysql+pymysql://" + url.split("://", 1)[1]
    if url.startswith("mariadb+pymysql://"):
        return "mysql+pymysql://" + url.split("://", 1)[1]
    return url


def dialect_of(engine: Engine) -> str:
    """'sqlite', 'postgresql' or 'mysql'."""
    return engine.dialect.name


def link_bound_args(backend: str) -> dict[str, Any]:
    """PostgreSQL (libpq): the connection arguments that bound a dead link (the module's text).
    Other back ends: none (MariaDB's are set on its socket by `bound_mysql_links`)."""
    if backend != "postgresql":
        return {}
    return {"connect_timeout": DB_CONNECT_TIMEOUT_S, "keepalives": 1,
            "keepalives_idle": DB_KEEPALIVE_IDLE_S, "keepalives_interval": DB_KEEPALIVE_INTERVAL_S,
            "keepalives_count": DB_KEEPALIVE_COUNT, "tcp_user_timeout": DB_LINK_DEAD_S * 1000}


def bound_tcp_socket(sock: socket.socket) -> None:
    """The dead-link bound of the module's text on a connected TCP socket (what libpq does for
    `link_bound_args`)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, DB_KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, DB_KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, DB_KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DB_LINK_DEAD_S * 1000)


def bound_mysql_links(engine: Engine) -> None:
    """MariaDB/MySQL over TCP: each new connection's socket is opened here, with the dead-link
    bound, and handed to PyMySQL (`defer_connect`, then `connect(sock)`); PyMySQL's own socket
    keeps the kernel's keepalive defaults (two hours of silence). A UNIX socket has no link."""

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        if cparams.get("unix_socket"):
            return None
        dbapi = dialect.loaded_dbapi
        conn = dbapi.connect(*cargs, **{**cparams, "defer_connect": True})
        host, port = cparams.get("host") or "localhost", int(cparams.get("port") or 3306)
        try:
            sock = socket.create_connection((host, port), cparams.get("connect_timeout", DB_CONNECT_TIMEOUT_S))
        except OSError as exc:  # as PyMySQL reports it (2003, CR_CONN_HOST_ERROR): a disconnect, not a crash
            raise dbapi.OperationalError(2003, f"Can't connect to MySQL server on {host!r} ({exc})") from exc
        try:
            bound_tcp_socket(sock)
            conn.connect(sock)
        except BaseException:
            sock.close()
            raise
        return conn


def make_engine(url: str, *, pool_size: int = 16, pool_overflow: int = 0,
                pool_timeout_s: float = 10.0, sqlite_synchronous: str = "FULL",
                wait_max_s: float | None = None, idle_in_tx_max_s: float = DB_IDLE_IN_TX_MAX_S,
                application_name: str = "") -> Engine:
    """`wait_max_s`: every lock wait's bound on this engine's connections (None: the
    server's default; SQLite: SQLITE_BUSY_TIMEOUT_MS). `application_name` (PostgreSQL):
    the role its connections show in pg_stat_activity (`role_name`), sent in the
    startup packet, so that an operator or `bench-ratio` can tell the pays' backends
    from the sealer's or the journal writer's."""
    url = normalize_url(url)
    kwargs: dict[str, Any] = {"future": True}
    if url.startswith("sqlite"):
        busy_s = wait_max_s if wait_max_s is not None else SQLITE_BUSY_TIMEOUT_MS / 1000
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_s}
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = pool_overflow
        kwargs["pool_timeout"] = pool_timeout_s
        kwargs["poolclass"] = sa.pool.QueuePool
        engine = sa.create_engine(url, **kwargs)
        _configure_sqlite(engine, sqlite_synchronous, int(busy_s * 1000))
        _session_wait_defaults(engine, int(busy_s * 1000))
        return engine
    # No pre-ping: it costs a round trip per transaction on the hot path. A
    # connection the server dropped fails its statement (UNAVAILABLE, safe to
    # retry by serial) and SQLAlchemy then invalidates the whole pool.
    kwargs.update(pool_size=pool_size, max_overflow=pool_overflow, pool_timeout=pool_timeout_s,
                  pool_recycle=POOL_RECYCLE_S)
    if url.startswith("mysql"):
        kwargs["isolation_level"] = "READ COMMITTED"
        kwargs["connect_args"] = {"charset": "utf8mb4", "connect_timeout": DB_CONNECT_TIMEOUT_S}
        if wait_max_s is not None:
            kwargs["connect_args"]["init_command"] = (
                f"SET SESSION innodb_lock_wait_timeout = {max(1, math.ceil(wait_max_s))}")
    else:  # PostgreSQL: session defaults in the startup packet, no round trip
        kwargs["connect_args"] = link_bound_args("postgresql")
        if wait_max_s is not None:
            kwargs["connect_args"]["options"] = (f"-c lock_timeout={int(wait_max_s * 1000)} "
                                                 f"-c idle_in_transaction_session_timeout={int(idle_in_tx_max_s * 1000)}")
        if application_name:
            kwargs["connect_args"]["application_name"] = application_name
    engine = sa.create_engine(url, **kwargs)
    db_watch.watch_pool(engine)
    if url.startswith("mysql"):
        bound_mysql_links(engine)
        _session_wait_defaults(engine, None if wait_max_s is None else int(wait_max_s * 1000))
        if wait_max_s is not None:
            _mariadb_idle_bound(engine, idle_in_tx_max_s)
    return engine


def _mariadb_idle_bound(engine: Engine, idle_in_tx_max_s: float) -> None:
    """MariaDB ends a transaction left idle, as PostgreSQL's idle_in_transaction_session_timeout
    does: a client gone mid-transaction (killed, or its link dead) would otherwise hold its row
    locks until wait_timeout (8 hours by default), failing every pay of those accounts. MySQL
    has no such setting; its connections are left as they are."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        if "mariadb" not in str(dbapi_conn.get_server_info()).lower():
            return
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"SET SESSION idle_transaction_timeout = {max(1, math.ceil(idle_in_tx_max_s))}")
        finally:
            cur.close()


def role_name(process: str, role: str = "") -> str:
    """The PostgreSQL application_name of a process's connections for one role: 'mis_adapter'
    (its serving pool), 'mis_adapter/sealer', 'bridge/journal-writer', ... (ROLE_SEP between)."""
    return f"{process}{ROLE_SEP}{role}" if role else process


def _configure_sqlite(engine: Engine, synchronous: str, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError("sqlite synchronous must be FULL or NORMAL")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so we can say BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get("read_only"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_database(admin_url: str, name: str) -> str:
    """Creates (or recreates) database `name` on the server of `admin_url` and
    returns the URL of the new database. For tests and `seed`."""
    admin_url = normalize_url(admin_url)
    u = sa.make_url(admin_url)
    if u.get_backend_name() == "sqlite":
        raise ValueError("create_database is for server databases")
    eng = sa.create_engine(u, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as conn:
            if u.get_backend_name() == "postgresql":
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
                conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    finally:
        eng.dispose()
    return u.set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    u = sa.make_url(normalize_url(admin_url))
    eng = sa.create_engine(u, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as conn:
            if u.get_backend_name() == "postgresql":
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        eng.dispose()


def require_case_sensitive_serials(engine: Engine) -> None:
    """Serials are case-sensitive idempotency keys ('ab-1' and 'AB-1' are two
    payments). MariaDB/MySQL compare strings with the database's default
    collation, which is case-insensitive unless the database was created with
    a binary one: refuse to run on such a database rather than merge serials."""
    if engine.dialect.name != "mysql":
        return
    with engine.connect() as conn:
        collation = str(conn.exec_driver_sql("SELECT @@collation_database").scalar_one())
    if not (collation.endswith("_bin") or "_cs" in collation):
        raise SystemExit(f"database {engine.url.database!r} has collation {collation}, which compares serials "
                         f"case-insensitively; create it with CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
