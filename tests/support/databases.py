"""Real databases for tests: a fresh SQLite file, or a freshly created
database on the PostgreSQL / MariaDB servers. With CI=true an unreachable
server fails the test; elsewhere it skips with the reason."""
from __future__ import annotations

import os
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
def fresh_database(backend: str, tmp_path: Path, label: str = "t") -> Iterator[str]:
    """A URL to a new, empty database of `backend`, dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / (label + '-' + uuid.uuid4().hex[:8] + '.db')}"
        return
    admin = admin_url(backend)
    name = f"yd_{label}_{uuid.uuid4().hex[:10]}"
    url = create_database(admin, name)
    try:
        yield url
    finally:
        drop_database(admin, name)
