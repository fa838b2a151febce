"""Real databases for tests: a fresh SQLite file, or a freshly created
database on the PostgreSQL / MariaDB servers. With CI=true an unreachable
server fails the test; elsewhere it skips with the reason."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from yindian_common.db import create_database, drop_database, normalize_url

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URLS = [u for u in os.environ.get(
    "YINDIAN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test,postgresql://root@127.0.0.1:5432/test"
).split(",") if u]
MARIADB_ADMIN_URLS = [u for u in os.environ.get(
    "YINDIAN_TEST_MARIADB", "mysql://root@127.0.0.1:3306/test").split(",") if u]

_reachable: dict[str, str | None] = {}


def _first_reachable(urls: list[str]) -> str | None:
    for url in urls:
        eng = sa.create_engine(normalize_url(url), connect_args={"connect_timeout": 3})
        try:
            with eng.connect():
                return url
        except Exception:
            continue
        finally:
            eng.dispose()
    return None


def reachable_admin_url(backend: str) -> str | None:
    """The admin URL of a reachable server, or None."""
    if backend not in _reachable:
        urls = PG_ADMIN_URLS if backend == "postgresql" else MARIADB_ADMIN_URLS
        _reachable[backend] = _first_reachable(urls)
    return _reachable[backend]


def admin_url(backend: str) -> str:
    """The admin URL of a reachable server, or fail (CI) / skip (elsewhere)."""
    url = reachable_admin_url(backend)
    if url is None:
        msg = f"{backend} server not reachable (tried {PG_ADMIN_URLS if backend == 'postgresql' else MARIADB_ADMIN_URLS})"
        if IN_CI:
            pytest.fail(msg + " and CI=true requires it")
        pytest.skip(msg + "; set YINDIAN_TEST_PG / YINDIAN_TEST_MARIADB")
    return url


@contextmanager
def fresh_database(backend: str, tmp_path: Path, label: str = "t", *, schema: str | None = None) -> Iterator[str]:
    """A URL to a new database of `backend`, dropped afterwards: empty, or with `schema` ("mis": the MIS
    schema at its alembic heads; "bridge": the bridge journal's) as `upgrade` leaves it. A migrated
    database is a copy of one migrated once per test process (see `_Templates`), because running the
    migrations costs 3-15 s per database and most tests only need the result; tests OF the migrations
    (upgrade from empty, downgrade, stamping) ask for an empty database."""
    if backend == "sqlite":
        path = tmp_path / (label + "-" + uuid.uuid4().hex[:8] + ".db")
        if schema:
            shutil.copyfile(_TEMPLATES.sqlite(schema), path)
        yield f"sqlite:///{path}"
        return
    admin = admin_url(backend)
    name = f"yd_{label}_{uuid.uuid4().hex[:10]}"
    url = _TEMPLATES.clone(backend, admin, schema, name) if schema else create_database(admin, name)
    try:
        yield url
    finally:
        drop_database(admin, name)


def migrated_sqlite(path: Path, schema: str = "mis") -> str:
    """The URL of a new SQLite database at `path` already at `schema`'s heads (a copy of the template)."""
    shutil.copyfile(_TEMPLATES.sqlite(schema), path)
    return f"sqlite:///{path}"


def _upgrade(schema: str, url: str) -> None:
    if schema == "mis":
        from mis_adapter.migrate import upgrade
    elif schema == "bridge":
        from bridge.migrate import upgrade
    else:
        raise ValueError(f"unknown schema {schema!r}")
    engine = sa.create_engine(normalize_url(url))
    try:
        upgrade(engine)
    finally:
        engine.dispose()


class _Templates:
    """Migrated databases to copy, made once per test process (per xdist worker, so no worker waits on
    another's, and dropped when the process exits): a SQLite file copied byte for byte; a PostgreSQL
    database used as `CREATE DATABASE … TEMPLATE` (an exact copy; nobody stays connected to it); for
    MariaDB, which has no templates, the migrated database's own `SHOW CREATE TABLE` / `SHOW CREATE
    TRIGGER` statements replayed, then its rows (alembic's version row) copied."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dir: str | None = None
        self._sqlite: dict[str, Path] = {}
        self._servers: dict[tuple[str, str], str] = {}  # (backend, schema) -> template database name
        self._mariadb_ddl: dict[str, tuple[list[str], list[str]]] = {}  # schema -> (DDL, tables with rows)
        self._to_drop: list[tuple[str, str]] = []
        atexit.register(self.drop_all)

    def sqlite(self, schema: str) -> Path:
        with self._lock:
            if schema not in self._sqlite:
                if self._dir is None:
                    self._dir = tempfile.mkdtemp(prefix="yd_templates_")
                path = Path(self._dir) / f"{schema}.db"
                _upgrade(schema, f"sqlite:///{path}")
                self._sqlite[schema] = path
            return self._sqlite[schema]

    def clone(self, backend: str, admin: str, schema: str, name: str) -> str:
        with self._lock:
            key = (backend, schema)
            if key not in self._servers:
                template = f"yd_template_{schema}_{uuid.uuid4().hex[:10]}"
                self._to_drop.append((admin, template))
                _upgrade(schema, create_database(admin, template))
                self._servers[key] = template
                if backend == "mariadb":
                    self._mariadb_ddl[schema] = _mariadb_schema(admin, template)
            template = self._servers[key]
        u = sa.make_url(normalize_url(admin))
        eng = sa.create_engine(u, isolation_level="AUTOCOMMIT")
        try:
            with eng.connect() as conn:
                if backend == "postgresql":
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                else:
                    ddl, filled = self._mariadb_ddl[schema]
                    conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
                    conn.exec_driver_sql(f"USE `{name}`")
                    conn.exec_driver_sql("SET SESSION foreign_key_checks = 0")
                    for stmt in ddl:
                        conn.exec_driver_sql(stmt)
                    for table in filled:
                        conn.exec_driver_sql(f"INSERT INTO `{name}`.`{table}` SELECT * FROM `{template}`.`{table}`")
        finally:
            eng.dispose()
        return u.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        """Drops the templates made so far; later requests make them again."""
        with self._lock:
            to_drop, self._to_drop, self._servers, self._sqlite = self._to_drop, [], {}, {}
        for admin, template in to_drop:
            with contextlib.suppress(Exception):  # the server may be gone at exit: nothing else to do
                drop_database(admin, template)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _mariadb_schema(admin: str, template: str) -> tuple[list[str], list[str]]:
    """The statements that recreate MariaDB database `template`'s tables and triggers, and its tables
    that hold rows."""
    eng = sa.create_engine(sa.make_url(normalize_url(admin)).set(database=template))
    ddl: list[str] = []
    filled: list[str] = []
    try:
        with eng.connect() as conn:
            tables = [r[0] for r in conn.exec_driver_sql("SHOW FULL TABLES WHERE Table_type = 'BASE TABLE'")]
            assert not conn.exec_driver_sql("SHOW FULL TABLES WHERE Table_type = 'VIEW'").first(), \
                "the MariaDB template copies tables and triggers only: add views here"
            assert not conn.exec_driver_sql(
                "SELECT 1 FROM information_schema.routines WHERE routine_schema = DATABASE()").first(), \
                "the MariaDB template copies tables and triggers only: add routines here"
            for t in tables:
                ddl.append(conn.exec_driver_sql(f"SHOW CREATE TABLE `{t}`").one()[1])
                if conn.exec_driver_sql(f"SELECT 1 FROM `{t}` LIMIT 1").first():
                    filled.append(t)
            for trig in [r[0] for r in conn.exec_driver_sql("SHOW TRIGGERS")]:
                row = conn.exec_driver_sql(f"SHOW CREATE TRIGGER `{trig}`").mappings().one()
                ddl.append(row["SQL Original Statement"])
    finally:
        eng.dispose()
    return ddl, filled


_TEMPLATES = _Templates()


def drop_templates() -> None:
    _TEMPLATES.drop_all()
