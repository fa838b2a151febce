"""Database faults seen from the wire (issue 9 items 2, 4, 6): a connection
broken at COMMIT is in doubt, a connection broken before it is plainly
unavailable, terminated backends never make a call answer UNKNOWN, and a
row lock held elsewhere never holds a call past its deadline."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from mis_adapter.db.core import Customer, JournalEntry, Payment
from tests.support.databases import fresh_database
from tests.support.mis_data import BillSpec, RunningAdapter, add_account, running_adapter
from tests.support.topology import BRANCHES3, topology_databases
from tests.support.waiting import wait_until
from yindian.v1 import billing_pb2 as pb
from yindian_common.status import error_info

pytestmark = pytest.mark.migrated("mis")  # running_adapter needs the MIS schema

BILLS = [BillSpec("202610", 15_000, __import__("datetime").date(2026, 11, 25))]


@pytest.fixture
def pg_adapter(tmp_path: Path) -> Iterator[RunningAdapter]:
    with fresh_database("postgresql", tmp_path, schema="mis") as url, running_adapter(url) as a:
        yield a


@pytest.fixture(params=["postgresql", "mariadb"])
def server_adapter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningAdapter]:
    with fresh_database(request.param, tmp_path, schema="mis") as url, running_adapter(url) as a:
        yield a


def pay_req(serial: str, acct: str, amount: int) -> pb.PayRequest:
    return pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=amount, outlet_code="OUT1",
                         teller_id="T01", channel=pb.CHANNEL_COUNTER)


def payment_rows(a: RunningAdapter) -> int:
    with a.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(Payment.__table__)).scalar_one()


def backend_id(dbapi_conn: Any) -> int:
    """The server's id of a DBAPI connection (PostgreSQL pid, MariaDB thread id)."""
    if hasattr(dbapi_conn, "info") and hasattr(dbapi_conn.info, "backend_pid"):
        return int(dbapi_conn.info.backend_pid)
    return int(dbapi_conn.thread_id())


def kill_backend(engine: sa.Engine, bid: int) -> None:
    """Ends a server connection from a second connection of its own."""
    killer = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    try:
        with killer.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": bid})
            else:
                conn.exec_driver_sql(f"KILL {int(bid)}")
    finally:
        killer.dispose()


def kill_all_backends(engine: sa.Engine) -> int:
    """Ends every connection of the engine's database but the killer's own."""
    killer = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    try:
        with killer.connect() as conn:
            if engine.dialect.name == "postgresql":
                return len(conn.execute(sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()")).all())
            ids = [r[0] for r in conn.execute(sa.text(
                "SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id <> CONNECTION_ID()"))]
            for i in ids:
                with contextlib.suppress(sa.exc.DBAPIError):  # ended meanwhile
                    conn.exec_driver_sql(f"KILL {int(i)}")
            return len(ids)
    finally:
        killer.dispose()


# ---- item 2: a connection broken at COMMIT is in doubt ----
def test_connection_broken_at_commit_answers_commit_in_doubt(pg_adapter: RunningAdapter) -> None:
    a = pg_adapter
    acct = add_account(a.engine, "01", 1, BILLS)

    def break_at_commit(conn: sa.Connection) -> None:
        kill_backend(a.engine, backend_id(conn.connection.driver_connection))

    event.listen(a.engine, "commit", break_at_commit)
    try:
        with pytest.raises(grpc.RpcError) as exc:
            a.stub.Pay(pay_req("P-DOUBT", acct, 5_000), metadata=a.md(), timeout=30)
    finally:
        event.remove(a.engine, "commit", break_at_commit)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(exc.value).reason == "COMMIT_IN_DOUBT"
    # The bank resolves the doubt by asking (here: nothing was committed) and may then pay the same serial.
    assert a.stub.GetPayment(pb.GetPaymentRequest(bank_serial="P-DOUBT"), metadata=a.md()).state == \
        pb.PAYMENT_STATE_NOT_FOUND
    r = a.stub.Pay(pay_req("P-DOUBT", acct, 5_000), metadata=a.md(), timeout=30)
    assert r.amount_fen == 5_000 and payment_rows(a) == 1


def test_connection_broken_before_commit_answers_db_unavailable(pg_adapter: RunningAdapter) -> None:
    a = pg_adapter
    acct = add_account(a.engine, "01", 1, BILLS)
    killed: list[int] = []

    def break_before_first_statement(conn: sa.Connection, *_args: Any) -> None:
        if not killed:
            killed.append(backend_id(conn.connection.driver_connection))
            kill_backend(a.engine, killed[0])

    a.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=a.md())  # the pool is warm
    event.listen(a.engine, "before_cursor_execute", break_before_first_statement)
    try:
        with pytest.raises(grpc.RpcError) as exc:
            a.stub.Pay(pay_req("P-DOWN", acct, 5_000), metadata=a.md(), timeout=30)
    finally:
        event.remove(a.engine, "before_cursor_execute", break_before_first_statement)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(exc.value).reason == "DB_UNAVAILABLE"
    assert payment_rows(a) == 0


# ---- item 6: terminated backends never make a call answer UNKNOWN ----
def test_terminated_backends_give_only_defined_statuses(server_adapter: RunningAdapter) -> None:
    a = server_adapter
    accts = [add_account(a.engine, "01", i, BILLS) for i in range(1, 5)]
    defined = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
    seen: dict[grpc.StatusCode, int] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def calls(k: int, n: int) -> list[Callable[[], object]]:
        acct = accts[k % len(accts)]
        return [lambda: a.stub.Pay(pay_req(f"L{k}-{n}", acct, 100), metadata=a.md(), timeout=10),
                lambda: a.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=a.md(), timeout=10),
                lambda: a.stub.GetPayment(pb.GetPaymentRequest(bank_serial=f"L{k}-{n}"), metadata=a.md(),
                                          timeout=10)]

    def client(k: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            for call in calls(k, n):
                try:
                    call()
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                with lock:
                    seen[code] = seen.get(code, 0) + 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            deadline = time.monotonic() + 10
            with lock:
                target = seen.get(grpc.StatusCode.OK, 0) + 20
            while time.monotonic() < deadline:  # some load between the kills
                with lock:
                    if seen.get(grpc.StatusCode.OK, 0) >= target:
                        break
                stop.wait(0.02)
            kill_all_backends(a.engine)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert set(seen) - {grpc.StatusCode.OK} <= defined, seen
    assert seen.get(grpc.StatusCode.OK, 0) > 0
    # and the service recovers
    r = a.stub.Pay(pay_req("AFTER", accts[0], 100), metadata=a.md(), timeout=10)
    assert r.amount_fen == 100
    with a.engine.connect() as conn:
        t, j = Customer.__table__, JournalEntry.__table__
        assert conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() == 4
        assert conn.execute(sa.select(sa.func.count()).select_from(j)).scalar_one() == payment_rows(a)


# ---- item 4: a row lock held elsewhere never holds a call past its deadline ----
@pytest.mark.timeout(120)
def test_a_held_lock_ends_the_pay_within_its_deadline(db_url: str) -> None:
    with running_adapter(db_url) as a:
        acct = add_account(a.engine, "01", 1, BILLS)
        holder = a.engine.connect()
        tx = holder.begin()
        if a.engine.dialect.name == "sqlite":  # one writer: the held write lock is the "row lock"
            holder.exec_driver_sql("UPDATE customers SET prepaid_fen = prepaid_fen WHERE account_no = ?", (acct,))
        else:
            holder.execute(sa.select(Customer.__table__.c.account_no)
                           .where(Customer.__table__.c.account_no == acct).with_for_update())
        try:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as exc:
                a.stub.Pay(pay_req("LOCKED", acct, 5_000), metadata=a.md(), timeout=2)
            elapsed = time.monotonic() - t0
        finally:
            tx.rollback()
            holder.close()
        assert elapsed < 2.5
        assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        if exc.value.code() == grpc.StatusCode.UNAVAILABLE:
            assert error_info(exc.value).reason == "DB_TIMEOUT"
        assert payment_rows(a) == 0
        if a.engine.dialect.name == "postgresql":  # the server stopped waiting too
            with a.engine.connect() as conn:
                assert conn.execute(sa.text("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = "
                                            "current_database() AND wait_event_type = 'Lock'")).scalar_one() == 0
        # once the lock is gone, the same serial is paid
        r = a.stub.Pay(pay_req("LOCKED", acct, 5_000), metadata=a.md(), timeout=5)
        assert r.amount_fen == 5_000 and payment_rows(a) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rpc", ["pay", "cancel"])
def test_a_held_lock_in_a_branch_database_ends_the_call_within_its_deadline(tmp_path: Path, rpc: str) -> None:
    """The same with branch databases (issue 10): a pay or a cancel goes through the front registry to
    branch 02, and its transaction there is bounded by the call's deadline too, not by the configured
    maximum (10 s) — else it would go on waiting after the bank was answered and apply when the lock
    goes."""
    with topology_databases("postgresql", BRANCHES3, tmp_path, schema="mis") as topo, \
            running_adapter(topo.db, branch_db=topo.branch_db) as a:
        b02 = a.ctx.router.engine_for_branch("02")
        acct = add_account(b02, "02", 1, BILLS)

        def lock_waiters() -> int:
            with b02.connect() as conn:
                return int(conn.execute(sa.text("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = "
                                                "current_database() AND wait_event_type = 'Lock'")).scalar_one())

        def branch_payments() -> int:
            with b02.connect() as conn:
                return int(conn.execute(sa.select(sa.func.count()).select_from(Payment.__table__)).scalar_one())

        def reversed_payments() -> int:
            with b02.connect() as conn:
                return int(conn.execute(sa.select(sa.func.count()).select_from(Payment.__table__)
                                        .where(Payment.__table__.c.state == "REVERSED")).scalar_one())

        if rpc == "cancel":
            a.stub.Pay(pay_req("LOCKED-02", acct, 5_000), metadata=a.md(), timeout=5)

        def call(timeout: float) -> Any:
            if rpc == "pay":
                return a.stub.Pay(pay_req("LOCKED-02", acct, 5_000), metadata=a.md(), timeout=timeout)
            return a.stub.Cancel(pb.CancelRequest(cancel_serial="C-LOCKED-02", original_serial="LOCKED-02",
                                                  amount_fen=5_000, reason="r"), metadata=a.md(), timeout=timeout)

        before = (branch_payments(), reversed_payments())
        holder = b02.connect()
        tx = holder.begin()
        holder.execute(sa.select(Customer.__table__.c.account_no)
                       .where(Customer.__table__.c.account_no == acct).with_for_update())
        try:
            with pytest.raises(grpc.RpcError) as exc:
                call(2)
            assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            # while the lock is still held: the branch server stopped waiting, and nothing was applied
            wait_until(lambda: lock_waiters() == 0, f"the branch {rpc} to stop waiting for the lock", 2.0)
            assert (branch_payments(), reversed_payments()) == before
        finally:
            tx.rollback()
            holder.close()
        assert (branch_payments(), reversed_payments()) == before
        # once the lock is gone, the same serial goes through, in branch 02
        call(5)
        assert (branch_payments(), reversed_payments()) == ((1, 0) if rpc == "pay" else (1, 1))


def test_the_bank_status_read_is_translated_where_it_happens(pg_adapter: RunningAdapter) -> None:
    """Called outside any status guard, a status read on a terminated backend is UNAVAILABLE."""
    from yindian_common.errors import Unavailable
    a = pg_adapter
    a.ctx.banks.ensure_known("ICBC")  # the pool is warm
    kill_all_backends(a.engine)
    with pytest.raises(Unavailable) as exc:
        a.ctx.banks.ensure_known("ABC")
    assert exc.value.reason == "DB_UNAVAILABLE"
    a.ctx.banks.ensure_known("ABC")  # and the next read reconnects
