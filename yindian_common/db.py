"""Database engines for the three supported back ends, configured the same
way for every process: SQLite (embedded default, WAL, synchronous=FULL,
BEGIN IMMEDIATE for writers so that concurrent writers queue instead of
failing on lock upgrade), PostgreSQL (psycopg 3) and MariaDB/MySQL (PyMySQL,
READ COMMITTED so that a row read after a lock wait is the committed one).

Transactions belong to the caller; nothing here commits on its own."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

SQLITE_BUSY_TIMEOUT_MS = 30_000
POOL_RECYCLE_S = 1_800


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


def make_engine(url: str, *, pool_size: int = 16, pool_overflow: int = 0,
                pool_timeout_s: float = 10.0, sqlite_synchronous: str = "FULL") -> Engine:
    url = normalize_url(url)
    kwargs: dict[str, Any] = {"future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = pool_overflow
        kwargs["pool_timeout"] = pool_timeout_s
        kwargs["poolclass"] = sa.pool.QueuePool
        engine = sa.create_engine(url, **kwargs)
        _configure_sqlite(engine, sqlite_synchronous)
        return engine
    # No pre-ping: it costs a round trip per transaction on the hot path. A
    # connection the server dropped fails its statement (UNAVAILABLE, safe to
    # retry by serial) and SQLAlchemy then invalidates the whole pool.
    kwargs.update(pool_size=pool_size, max_overflow=pool_overflow, pool_timeout=pool_timeout_s,
                  pool_recycle=POOL_RECYCLE_S)
    if url.startswith("mysql"):
        kwargs["isolation_level"] = "READ COMMITTED"
        kwargs.setdefault("connect_args", {})["charset"] = "utf8mb4"
    return sa.create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError("sqlite synchronous must be FULL or NORMAL")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so we can say BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
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
