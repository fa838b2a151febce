"""A call's deadline tightens its connection's wait bounds, and the pooled
connection goes back with the engine's defaults (yindian_common.db)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.databases import fresh_database
from yindian_common.db import WaitBound, bound_waits, db_wait_bound, make_engine
from yindian_common.errors import Unavailable


@pytest.fixture(params=["sqlite", "mariadb"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as u:
        yield u


def session_bound_ms(conn: object, dialect: str) -> int:
    if dialect == "sqlite":
        return int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one())  # type: ignore[attr-defined]
    lock_s, stmt_s = conn.exec_driver_sql(  # type: ignore[attr-defined]
        "SELECT @@innodb_lock_wait_timeout, @@max_statement_time").one()
    return int(float(stmt_s) * 1000) if float(stmt_s) else int(lock_s) * 1000


def test_a_tightened_connection_returns_to_the_pool_with_the_defaults(url: str) -> None:
    engine = make_engine(url, pool_size=1, wait_max_s=10)
    dialect = engine.dialect.name
    try:
        with engine.connect() as conn:
            conn.begin()
            bound_waits(conn, WaitBound(1_300, 2_300))
            assert session_bound_ms(conn, dialect) == 1_250  # in steps of 250 ms
        with engine.connect() as conn:  # the same pooled connection
            assert session_bound_ms(conn, dialect) == 10_000
    finally:
        engine.dispose()


class _Settings:
    db_wait_max_s = 10.0


def test_the_bound_follows_the_deadline_and_a_passed_deadline_does_no_work() -> None:
    assert db_wait_bound(_Settings(), None).wait_ms == 10_000
    assert db_wait_bound(_Settings(), 2.1).wait_ms == 2_000
    with pytest.raises(Unavailable) as exc:
        db_wait_bound(_Settings(), 0.05)
    assert exc.value.reason == "DEADLINE_PASSED"


def test_a_session_keeps_its_bound_while_it_fits_the_calls_and_never_longer(url: str) -> None:
    """Within one checkout: a call allowing up to 500 ms more keeps the session's bound (no statement
    sent); one allowing less than it, or 500 ms more or beyond, gets its own (stepped down to 250 ms)."""
    engine = make_engine(url, pool_size=1, wait_max_s=10)
    dialect = engine.dialect.name
    seen = []
    try:
        with engine.connect() as conn:
            for wait_ms in (1_300, 1_600, 1_260, 1_200, 1_499, 1_500):
                conn.begin()
                bound_waits(conn, WaitBound(wait_ms, wait_ms + 1_000))
                seen.append(session_bound_ms(conn, dialect))
                conn.commit()
    finally:
        engine.dispose()
    assert seen == [1_250, 1_250, 1_250, 1_000, 1_000, 1_500]
