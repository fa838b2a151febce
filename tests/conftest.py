"""Shared fixtures: real databases on all three back ends."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.databases import fresh_database
from tests.support.topology import BRANCHES3, SINGLE, Topology, topology_databases

ALL_BACKENDS = ["sqlite", "postgresql", "mariadb"]
SQLITE_PG = ["sqlite", "postgresql"]
SERVERS = ["postgresql", "mariadb"]  # for `parametrize("db_url", SERVERS, indirect=True)`: what SQLite cannot do


@pytest.fixture(params=ALL_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each of SQLite, PostgreSQL and MariaDB."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=SQLITE_PG)
def db_url_sqlite_pg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on SQLite and on PostgreSQL."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    with fresh_database("sqlite", tmp_path) as url:
        yield url


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """An empty PostgreSQL database (tests of what only PostgreSQL has: plans, HOT updates, its driver)."""
    with fresh_database("postgresql", tmp_path) as url:
        yield url


TOPOLOGY_PARAMS = [pytest.param((b, t), id=f"{b}-{t}") for t in (SINGLE, BRANCHES3) for b in SQLITE_PG]


@pytest.fixture(params=TOPOLOGY_PARAMS)
def topology(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Topology]:
    """One database, and a front database plus branch databases 02 and 03, on SQLite and PostgreSQL."""
    backend, name = request.param
    with topology_databases(backend, name, tmp_path) as topo:
        yield topo


@pytest.fixture(params=[p for p in TOPOLOGY_PARAMS if p.id != "postgresql-branches3"])
def topology_lite(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Topology]:
    """`topology` without PostgreSQL branch databases: for scenarios whose SQL is the single database's
    (validation, cursor, lease, window), where a third and fourth PostgreSQL database per test adds
    only setup and drop time."""
    backend, name = request.param
    with topology_databases(backend, name, tmp_path) as topo:
        yield topo
