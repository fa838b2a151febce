"""Shared fixtures: real databases on all three back ends.

The database fixtures give an empty database, or with `@pytest.mark.migrated("mis")` (or "bridge") on the
test or module one already at that schema's alembic heads: a copy of a database migrated once per test
process, which saves the 3-15 s the migrations take per database. Tests of the migrations themselves
(upgrade from empty, downgrade, stamping) must not use the mark."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.databases import drop_templates, fresh_database
from tests.support.topology import BRANCHES3, SINGLE, Topology, topology_databases


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "migrated(schema): the database fixtures give a database already at the "
                                       "schema's heads ('mis' or 'bridge') instead of an empty one")


def pytest_sessionfinish(session: pytest.Session) -> None:
    drop_templates()  # at the end of each xdist worker's session too: a worker may leave by os._exit, past atexit


def _schema(request: pytest.FixtureRequest) -> str | None:
    mark = request.node.get_closest_marker("migrated")
    return str(mark.args[0]) if mark else None


ALL_BACKENDS = ["sqlite", "postgresql", "mariadb"]
SQLITE_PG = ["sqlite", "postgresql"]
SERVERS = ["postgresql", "mariadb"]  # for `parametrize("db_url", SERVERS, indirect=True)`: what SQLite cannot do


@pytest.fixture(params=ALL_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each of SQLite, PostgreSQL and MariaDB."""
    with fresh_database(request.param, tmp_path, schema=_schema(request)) as url:
        yield url


@pytest.fixture(params=SQLITE_PG)
def db_url_sqlite_pg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on SQLite and on PostgreSQL."""
    with fresh_database(request.param, tmp_path, schema=_schema(request)) as url:
        yield url


@pytest.fixture
def sqlite_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database("sqlite", tmp_path, schema=_schema(request)) as url:
        yield url


@pytest.fixture
def pg_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty PostgreSQL database (tests of what only PostgreSQL has: plans, HOT updates, its driver)."""
    with fresh_database("postgresql", tmp_path, schema=_schema(request)) as url:
        yield url


TOPOLOGY_PARAMS = [pytest.param((b, t), id=f"{b}-{t}") for t in (SINGLE, BRANCHES3) for b in SQLITE_PG]


@pytest.fixture(params=TOPOLOGY_PARAMS)
def topology(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Topology]:
    """One database, and a front database plus branch databases 02 and 03, on SQLite and PostgreSQL."""
    backend, name = request.param
    with topology_databases(backend, name, tmp_path, schema=_schema(request)) as topo:
        yield topo


@pytest.fixture(params=[p for p in TOPOLOGY_PARAMS if p.id != "postgresql-branches3"])
def topology_lite(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Topology]:
    """`topology` without PostgreSQL branch databases: for scenarios whose SQL is the single database's
    (validation, cursor, lease, window), where a third and fourth PostgreSQL database per test adds
    only setup and drop time."""
    backend, name = request.param
    with topology_databases(backend, name, tmp_path, schema=_schema(request)) as topo:
        yield topo


# The longest tests, started first: the chaos soak alone runs 5-6 minutes, so a suite that reaches it late
# lasts that much longer than the work it has. With `--dist worksteal` (Makefile) the other workers take
# the tests queued behind it.
RUN_FIRST = ("tests/e2e/test_chaos.py::test_chaos_soak_holds_every_invariant",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.nodeid not in RUN_FIRST)  # stable: the collected order otherwise
