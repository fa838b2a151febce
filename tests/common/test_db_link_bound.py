"""A database link that stops carrying packets is given up within its bound (yindian_common.db):
on PostgreSQL and MariaDB, a statement waiting for its answer on a link that went dark ends with
the driver's connection error within DB_LINK_DEAD_S, a new connection within DB_CONNECT_TIMEOUT_S,
both while the link is still dark; once it heals, the same engine answers again. Before the bound,
the statement waited until the kernel gave up retransmitting (15 minutes and more)."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.databases import fresh_database
from tests.support.netns_link import NetnsLink, database_link
from tests.support.waiting import wait_until
from yindian_common import db_watch
from yindian_common.db import DB_CONNECT_TIMEOUT_S, DB_LINK_DEAD_S, make_engine

pytestmark = pytest.mark.timeout(120)
# A bound's slack on a busy 2-core machine; a missing bound waits 15 minutes.
SLACK_S = 8.0
SLEEP_S = 60  # the statement in flight: it would still be running when the bound ends it

SLEEP_SQL = {"postgresql": f"SELECT pg_sleep({SLEEP_S})", "mysql": f"SELECT SLEEP({SLEEP_S})"}
RUNNING_SQL = {
    "postgresql": "SELECT COUNT(*) FROM pg_stat_activity WHERE query = :q AND state = 'active'",
    "mysql": "SELECT COUNT(*) FROM information_schema.processlist WHERE info = :q"}


@pytest.fixture(params=["postgresql", "mariadb"])
def linked(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, sa.Engine, NetnsLink]]:
    """(the database's URL across a link, an engine straight to it whose lock waits end after 1 s, the link)."""
    with fresh_database(request.param, tmp_path) as url:
        direct = make_engine(url, pool_size=1, wait_max_s=1.0)
        try:
            with database_link(url) as (link, far_url):
                yield far_url, direct, link
        finally:
            direct.dispose()


@pytest.fixture
def far_engines() -> Iterator[list[sa.Engine]]:
    made: list[sa.Engine] = []
    yield made
    for e in made:
        e.dispose()


def sleeping_on_the_server(far: sa.Engine, direct: sa.Engine, due: float = 0.0
                           ) -> tuple[threading.Thread, list[BaseException | None]]:
    """A long statement sent on `far` from a thread (under db_watch.calls_due(due) when `due` is set),
    once the server runs it (seen on `direct`): (the thread, where its outcome will be: None or the
    exception it raised)."""
    dialect = far.dialect.name
    outcome: list[BaseException | None] = []

    def in_flight() -> None:
        try:
            with db_watch.calls_due(due), far.connect() as conn:
                conn.exec_driver_sql(SLEEP_SQL[dialect]).all()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=in_flight, daemon=True)
    t.start()

    def running() -> bool:
        with direct.connect() as conn:
            return bool(conn.execute(sa.text(RUNNING_SQL[dialect]), {"q": SLEEP_SQL[dialect]}).scalar_one())

    wait_until(running, "the statement running on the server")
    return t, outcome


def test_a_statement_on_a_dead_link_ends_within_the_bound_and_the_engine_recovers(
        linked: tuple[str, sa.Engine, NetnsLink], far_engines: list[sa.Engine]) -> None:
    far_url, direct, link = linked
    far = make_engine(far_url, pool_size=2)
    far_engines.append(far)
    with far.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    t, outcome = sleeping_on_the_server(far, direct)
    link.blackhole()
    t0 = time.monotonic()
    t.join(DB_LINK_DEAD_S + SLACK_S)
    ended_s = time.monotonic() - t0
    assert not t.is_alive(), f"the statement still waits {ended_s:.1f} s after its link went dark"
    assert isinstance(outcome[0], sa.exc.OperationalError), outcome
    assert outcome[0].connection_invalidated  # a disconnect: the pool does not hand the connection out again

    # A connection opened while the link is dark gives up within its own bound.
    t0 = time.monotonic()
    with pytest.raises(sa.exc.OperationalError), far.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert time.monotonic() - t0 < DB_CONNECT_TIMEOUT_S + SLACK_S

    link.heal()
    with far.connect() as conn:
        assert conn.exec_driver_sql("SELECT 2").scalar_one() == 2


def test_a_transaction_stranded_by_a_dead_link_gives_its_row_locks_back_within_the_idle_bound(
        linked: tuple[str, sa.Engine, NetnsLink], far_engines: list[sa.Engine]) -> None:
    """The server's side of a dead link: the client's open transaction holds its row locks until the
    server ends it. PostgreSQL does after idle_in_transaction_session_timeout, MariaDB after
    idle_transaction_timeout (else wait_timeout: 8 hours), both set from `idle_in_tx_max_s`."""
    far_url, direct, link = linked
    idle_s = 3
    far = make_engine(far_url, pool_size=1, wait_max_s=2.0, idle_in_tx_max_s=idle_s)
    far_engines.append(far)
    with direct.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
        conn.exec_driver_sql("INSERT INTO accounts VALUES (1, 100)")
    stranded = far.connect()
    stranded.begin()
    assert stranded.exec_driver_sql("SELECT balance FROM accounts WHERE id = 1 FOR UPDATE").scalar_one() == 100
    link.blackhole()

    def row_lockable() -> bool:
        try:
            with direct.begin() as conn:
                conn.exec_driver_sql("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
            return True
        except sa.exc.OperationalError:  # a lock wait that ended after 1 s
            return False

    wait_until(row_lockable, "the stranded transaction's row lock given back", timeout_s=idle_s + 2 * SLACK_S)
    with direct.connect() as conn:
        assert conn.exec_driver_sql("SELECT balance FROM accounts WHERE id = 1").scalar_one() == 101
    stranded.invalidate()
    stranded.close()


def test_a_call_due_before_the_link_bound_ends_its_pooled_statement_when_due(
        linked: tuple[str, sa.Engine, NetnsLink], far_engines: list[sa.Engine]) -> None:
    """Under db_watch.calls_due (Pay on the pool, Cancel), a statement waiting on a link that went dark
    ends when the call's answers are due, not DB_LINK_DEAD_S later: the engine's pooled connections
    (make_engine) are watched while checked out in that scope, and no longer once checked in."""
    far_url, direct, link = linked
    far = make_engine(far_url, pool_size=2)
    far_engines.append(far)
    due_in_s = 3.0
    assert due_in_s + 1.5 < DB_LINK_DEAD_S
    with db_watch.calls_due(time.monotonic() + 0.2), far.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    cuts = db_watch.overdue_cuts()
    t0 = time.monotonic()
    t, outcome = sleeping_on_the_server(far, direct, due=t0 + due_in_s)
    link.blackhole()
    t.join(due_in_s + 1.5 - (time.monotonic() - t0))
    ended_s = time.monotonic() - t0
    assert not t.is_alive(), f"the statement still waits {ended_s:.1f} s after it was sent, due at {due_in_s} s"
    assert isinstance(outcome[0], sa.exc.OperationalError), outcome
    assert db_watch.overdue_cuts() == cuts + 1  # the earlier call's connection, checked in, was not cut
    link.heal()
    with far.connect() as conn:
        assert conn.exec_driver_sql("SELECT 2").scalar_one() == 2
