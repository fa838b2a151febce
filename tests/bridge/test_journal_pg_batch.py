"""PostgreSQL's group commit straight on libpq (bridge.journal.pg_batch): its statements prepared once per
connection, its errors as SQLAlchemy's, the connection left idle for SQLAlchemy's own statements, and a
batch cut by a terminated backend written once on the writer's next connection."""
from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from bridge import journal as jn
from bridge.journal import Claims, Entry, Journal, JournalWriter
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(60)

AT = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)
DAY = dt.date(2026, 11, 28)
WAIT_S = 10.0
WRITER_APP = "bridge/journal-writer"  # the writer's backend's application_name (PgBatch.WRITER_SESSION)


def pay(serial: str, amount_fen: int = 1_000) -> Entry:
    return Entry(kind=jn.PAY, serial=serial, bank_id="ICBC", amount_fen=amount_fen, state=jn.PENDING,
                 business_date=DAY, created_at=AT, updated_at=AT, account_no="0100000017", outlet_code="O1",
                 teller_id="T1", channel=1)


def posted(serial: str, body: bytes = b"ok") -> jn.Outcome:
    return jn.outcome_for(pay(serial), jn.POSTED, AT + dt.timedelta(seconds=1), status_code=0, body=body)


@pytest.fixture
def pg(pg_url: str) -> Iterator[sa.Engine]:
    eng = make_engine(pg_url, pool_size=1)  # one pooled connection: every checkout gets the same one back
    jn.create_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def other(pg_url: str) -> Iterator[sa.Engine]:
    """Another engine on the same database: reads and locks from sessions of their own."""
    eng = make_engine(pg_url, pool_size=2)
    yield eng
    eng.dispose()


def test_a_refused_group_commit_is_sqlalchemys_error_writes_nothing_and_leaves_the_connection_usable(
        pg: sa.Engine, other: sa.Engine) -> None:
    """A batch PostgreSQL refuses (an amount beyond bigint) raises SQLAlchemy's DBAPIError over psycopg's
    error, as the writer's retry expects; none of its rows or outcomes is written; the same connection
    then carries the next group commit and SQLAlchemy's own transaction (the generic path)."""
    j, reader = Journal(pg), Journal(other)
    conn = j.open_writer_connection()
    try:
        assert j.write([pay("OK1"), pay("OK2")], [], conn) == {(jn.PAY, "OK1"), (jn.PAY, "OK2")}
        with pytest.raises(sa.exc.DBAPIError) as refused:
            j.write([pay("BAD1"), pay("BAD2", amount_fen=10**20)], [posted("OK1")], conn)
        assert isinstance(refused.value.orig, psycopg.errors.NumericValueOutOfRange)
        assert reader.get(jn.PAY, "BAD1") is None
        got = reader.get(jn.PAY, "OK1")
        assert got is not None and got.state == jn.PENDING and reader.audit_lines(jn.PAY, "OK1") == []
        assert not conn.in_transaction()

        assert j.write([pay("OK3")], [posted("OK1", b"one")], conn) == {(jn.PAY, "OK3")}
        # Two outcomes of one row: the generic path, in SQLAlchemy's transaction on the same connection.
        assert j.write([], [posted("OK2", b"first"), posted("OK2", b"second")], conn) == set()
        assert j.write([], [posted("OK3", b"three")], conn) == set()
    finally:
        j.close_writer_connection(conn)
    states = {s: reader.get(jn.PAY, s) for s in ("OK1", "OK2", "OK3")}
    assert {s: (e.state, e.body) for s, e in states.items() if e is not None} == {
        "OK1": (jn.POSTED, b"one"), "OK2": (jn.POSTED, b"second"), "OK3": (jn.POSTED, b"three")}
    assert [len(reader.audit_lines(jn.PAY, s)) for s in ("OK1", "OK2", "OK3")] == [1, 2, 1]


def test_a_connection_back_from_the_pool_and_its_replacement_both_carry_group_commits(
        pg: sa.Engine, other: sa.Engine) -> None:
    """The statements are prepared once per database connection: the pool's one connection, checked out
    again, does not prepare them twice (the server would refuse), and the connection that replaces it
    once it is invalidated (as the writer invalidates one after an error) prepares them afresh."""
    j = Journal(pg)
    assert j.write([pay("P1")], []) == {(jn.PAY, "P1")}
    assert j.write([pay("P2")], [posted("P1")]) == {(jn.PAY, "P2")}
    assert j.write([], [posted("P2")]) == set()
    with pg.connect() as conn:
        conn.invalidate()  # its database connection is closed; the pool's next checkout opens another
    conn = j.open_writer_connection()
    try:
        assert j.write([pay("P3")], [], conn) == {(jn.PAY, "P3")}
    finally:
        j.close_writer_connection(conn)
    assert [e.state for e in (Journal(other).get(jn.PAY, s) for s in ("P1", "P2", "P3")) if e is not None] == [
        jn.POSTED, jn.POSTED, jn.PENDING]


def _writer_waiting_on_a_lock(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [int(p) for p in conn.execute(sa.text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = :app AND wait_event_type = 'Lock'"), {"app": WRITER_APP}).scalars()]


def test_a_batch_cut_by_a_terminated_backend_is_written_once_on_the_next_connection(
        pg_url: str, other: sa.Engine) -> None:
    """The writer's backend is terminated while its group commit (new rows and other pays' outcomes) waits
    on a lock: the writer retries on a new connection, and once the lock is let go every caller is
    answered, every new row is journaled once and reported inserted, every outcome has one audit line
    and every outcome's claim is released."""
    engine = make_engine(pg_url, pool_size=2)
    jn.create_schema(engine)
    j, claims = Journal(engine), Claims()
    done = [pay(f"D{i}") for i in range(3)]
    j.write(done, [])
    queued: list[jn.NewRow | jn.Recording] = []

    def linger(_seconds: float) -> None:  # the writer lingers once woken: the rest of the batch arrives
        if len(queued) == 1:
            queued.extend(writer.journal_new(pay(f"N{i}"), claims.acquire((jn.PAY, f"N{i}"))[0])
                          for i in range(1, 3))
            queued.extend(writer.submit(posted(e.serial, e.serial.encode()), claims.acquire(e.key)[0],
                                        waited=True) for e in done)

    writer = JournalWriter(j, claims, ManualClock(AT), batch_max=16, queue_max=64, idle_wait_s=0.05,
                           commit_linger_s=0.001, sleep=linger)
    holder = other.connect()
    holder.execute(sa.text(f"LOCK TABLE {jn.requests.name} IN ACCESS EXCLUSIVE MODE"))
    writer.start()
    try:
        queued.append(writer.journal_new(pay("N0"), claims.acquire((jn.PAY, "N0"))[0]))
        deadline = time.monotonic() + WAIT_S
        blocked: list[int] = []
        while not blocked:
            assert time.monotonic() < deadline, "the writer's group commit never waited on the lock"
            blocked = _writer_waiting_on_a_lock(other)
        assert len(queued) == 6, "the whole batch was queued before its commit"
        with other.connect() as c:
            c.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": blocked[0]})
        deadline = time.monotonic() + WAIT_S
        while True:  # the writer's next connection waits on the lock in its turn
            assert time.monotonic() < deadline, "the writer never retried on a new connection"
            again = _writer_waiting_on_a_lock(other)
            if again and again != blocked:
                break
        holder.rollback()
        assert all(item.wait(WAIT_S) for item in queued)
        assert all(r.inserted for r in queued if isinstance(r, jn.NewRow))
    finally:
        holder.close()
        writer.stop(WAIT_S)
        engine.dispose()
    reader = Journal(other)
    with other.connect() as c:
        assert c.execute(sa.text(f"SELECT serial, count(*) FROM {jn.requests.name} GROUP BY serial "
                                 "ORDER BY serial")).all() == [(s, 1) for s in ("D0", "D1", "D2", "N0", "N1", "N2")]
    for e in done:
        got = reader.get(*e.key)
        assert got is not None and got.state == jn.POSTED and got.body == e.serial.encode()
        assert [a["state"] for a in reader.audit_lines(*e.key)] == [jn.POSTED]
    assert len(claims) == 3, "the outcomes' claims are released once durable; the new rows' are their callers'"


def test_a_group_commit_on_a_connection_whose_backend_is_gone_is_an_operational_error(
        pg: sa.Engine, other: sa.Engine) -> None:
    """The writer's backend is terminated while idle: its next group commit fails as a lost connection
    (SQLAlchemy's OperationalError, as psycopg's cursor reported it), and so does any after it on that
    connection, and nothing of them is written."""
    j = Journal(pg)
    conn = j.open_writer_connection()
    try:
        assert j.write([pay("G1")], [], conn) == {(jn.PAY, "G1")}
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        conn.commit()
        alive = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p")
        with other.connect() as c:
            c.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            deadline = time.monotonic() + WAIT_S
            while c.execute(alive, {"p": pid}).scalar_one():
                assert time.monotonic() < deadline, "the backend never ended"
                c.rollback()
        for serial in ("G2", "G3"):
            with pytest.raises(sa.exc.OperationalError):
                j.write([pay(serial)], [posted("G1")], conn)
    finally:
        conn.invalidate()
        conn.close()
    reader = Journal(other)
    assert reader.get(jn.PAY, "G2") is None and reader.get(jn.PAY, "G3") is None
    got = reader.get(jn.PAY, "G1")
    assert got is not None and got.state == jn.PENDING and reader.audit_lines(jn.PAY, "G1") == []
