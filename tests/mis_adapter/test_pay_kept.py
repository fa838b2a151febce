"""Pay's kept PostgreSQL connections (pay_pg.KeptConnections): a pay on PostgreSQL calls yd_pay on a
connection kept out of the pool between pays. What a user would notice if that went wrong: a pay
failing because an earlier pay, or the server, left its connection dead or in a bad state; a pay
waiting longer than its deadline allows because an earlier call's bound stayed on the session; more
connections than the pool's size; connections left open after the adapter stops."""
from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import pay_pg, payments
from mis_adapter.context import AdapterContext
from mis_adapter.db.core import Customer, Payment
from mis_adapter.migrate import upgrade
from mis_adapter.payments import PayCommand
from mis_adapter.settings import AdapterSettings
from tests.support.databases import fresh_database
from tests.support.mis_data import NOON, BillSpec, add_account, add_bank
from yindian_common.clock import ManualClock
from yindian_common.errors import Unavailable
from yindian_common.settings import load_settings

BILLS = [BillSpec("202610", 15_000, NOON.date().replace(day=25, month=11))]
POOL = 3
# How long a test waits to see a pay waiting on a row lock.
LOCK_SEEN_WITHIN_S = 20.0


@pytest.fixture
def books(tmp_path: Path) -> Iterator[AdapterContext]:
    with fresh_database("postgresql", tmp_path) as url:
        ctx = AdapterContext.build(load_settings(AdapterSettings, {"db": url, "insecure": True,
                                                                   "db_pool_size": POOL}), ManualClock(NOON))
        try:
            upgrade(ctx.router.primary)
            add_bank(ctx.router.primary, "ICBC")
            yield ctx
        finally:
            ctx.close()


def _pay(ctx: AdapterContext, serial: str, acct: str, amount: int = 1_000,
         time_left_s: float | None = None) -> payments.PayResult:
    return payments.pay(ctx, PayCommand("ICBC", serial, acct, amount, "O", "T"), time_left_s=time_left_s)


def _paid(engine: sa.Engine, acct: str) -> list[tuple[str, int]]:
    p = Payment.__table__
    watch = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    try:
        with watch.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(p.c.bank_serial, p.c.amount_fen)  # type: ignore[misc]
                                                   .where(p.c.account_no == acct).order_by(p.c.payment_id))]
    finally:
        watch.dispose()


def _kept_backends(engine: sa.Engine) -> list[int]:
    """The backend pids of the kept connections now free (the next pays' connections)."""
    kept_pool = pay_pg.kept_connections(engine)
    assert kept_pool is not None
    return [k.raw.info.backend_pid for k in kept_pool._free]


def _admin(engine: sa.Engine) -> sa.Engine:
    return sa.create_engine(engine.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")


def _terminate(engine: sa.Engine, pids: list[int]) -> None:
    admin = _admin(engine)
    try:
        with admin.connect() as conn:
            for pid in pids:
                assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one()
            # wait until the server has ended them (pg_terminate_backend only signals)
            for _ in range(2_000):
                alive = conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:p)"),
                                     {"p": pids}).scalar_one()
                if not alive:
                    return
                time.sleep(0.005)
    finally:
        admin.dispose()
    pytest.fail("terminated backends did not end")


@contextmanager
def _account_locked(engine: sa.Engine, acct: str) -> Iterator[sa.Connection]:
    """A transaction holding `acct`'s row lock, as a pay would (rolled back at the end)."""
    customers = Customer.__table__
    holder_engine = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    try:
        with holder_engine.connect() as holder:
            holder.begin()
            holder.execute(sa.select(customers.c.account_no).where(customers.c.account_no == acct).with_for_update())
            yield holder
            holder.rollback()
    finally:
        holder_engine.dispose()


def _wait_for_a_lock_wait(engine: sa.Engine) -> int:
    """The pid of a backend waiting on a lock (the pay's)."""
    admin = _admin(engine)
    try:
        with admin.connect() as conn:
            deadline = time.monotonic() + LOCK_SEEN_WITHIN_S
            while time.monotonic() < deadline:
                pid = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                           "AND wait_event_type = 'Lock' LIMIT 1")).scalar()
                if pid is not None:
                    return int(pid)
    finally:
        admin.dispose()
    pytest.fail("no pay waited on the account's lock")


def test_a_pay_after_its_kept_connections_backend_was_terminated_posts(books: AdapterContext) -> None:
    engine = books.router.primary
    acct = add_account(engine, "01", 1, BILLS)
    _pay(books, "P-1", acct)
    backends = _kept_backends(engine)
    assert backends  # the pay kept its connection
    _terminate(engine, backends)
    assert _pay(books, "P-2", acct, 2_000).amount_fen == 2_000
    assert _paid(engine, acct) == [("P-1", 1_000), ("P-2", 2_000)]
    assert set(_kept_backends(engine)).isdisjoint(backends)


def test_a_connection_ended_while_its_kept_session_is_set_up_refuses_the_pay_unavailable(
        books: AdapterContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server ends a new kept connection during its setup statement (its backend terminates itself,
    as a restart or an operator would): the pay is refused UNAVAILABLE DB_UNAVAILABLE (nothing was sent,
    nothing written), never UNKNOWN, the failed connection is not counted as open, and the next pay posts."""
    engine = books.router.primary
    acct = add_account(engine, "01", 1, BILLS)
    with monkeypatch.context() as m:
        m.setattr(pay_pg, "KEPT_SESSION", "SELECT pg_terminate_backend(pg_backend_pid())")
        with pytest.raises(Unavailable) as refused:
            _pay(books, "P-1", acct)
    assert refused.value.reason == "DB_UNAVAILABLE"
    assert _paid(engine, acct) == []
    kept_pool = pay_pg.kept_connections(engine)
    assert kept_pool is not None and kept_pool.open_count == 0
    assert _pay(books, "P-1", acct).amount_fen == 1_000
    assert _paid(engine, acct) == [("P-1", 1_000)]


def test_a_terminated_backend_fails_only_the_pay_in_flight(books: AdapterContext) -> None:
    """The pay whose backend is terminated while it waits answers UNAVAILABLE (in doubt: its call was
    sent; here nothing was written); the pays after it post on other connections."""
    engine = books.router.primary
    acct, other = add_account(engine, "01", 1, BILLS), add_account(engine, "01", 2, BILLS)
    _pay(books, "P-0", other)  # a kept connection is open and free
    failed: list[BaseException] = []

    def pay_held() -> None:
        try:
            _pay(books, "P-HELD", acct)
        except Unavailable as exc:
            failed.append(exc)

    with _account_locked(engine, acct):
        t = threading.Thread(target=pay_held)
        t.start()
        _terminate(engine, [_wait_for_a_lock_wait(engine)])
        t.join(timeout=30)
    assert len(failed) == 1 and getattr(failed[0], "reason", "") == "COMMIT_IN_DOUBT"
    assert _pay(books, "P-1", acct, 3_000).amount_fen == 3_000
    assert _pay(books, "P-2", other, 4_000).amount_fen == 4_000
    assert _paid(engine, acct) == [("P-1", 3_000)]
    assert _paid(engine, other) == [("P-0", 1_000), ("P-2", 4_000)]


def test_a_pay_after_a_failed_one_starts_clean_with_its_own_bound(books: AdapterContext) -> None:
    """A pay that timed out on a held row lock writes nothing and its connection is not reused; the next
    pay (no deadline) waits for a lock held briefly instead of failing at the earlier call's short
    bound; and a short deadline after a long one is kept (the session's bound is sent again)."""
    engine = books.router.primary
    acct = add_account(engine, "01", 1, BILLS)
    _pay(books, "P-0", acct)  # bound: the longest wait (db_wait_max_s)
    with _account_locked(engine, acct):
        before = _kept_backends(engine)
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            _pay(books, "P-SHORT", acct, time_left_s=0.6)
        assert time.monotonic() - t0 < 5.0  # the short bound, not the earlier call's 10 s
        assert set(_kept_backends(engine)).isdisjoint(before)  # the failed call's connection was closed
    assert _paid(engine, acct) == [("P-0", 1_000)]

    posted: list[int] = []
    with _account_locked(engine, acct) as holder:
        t = threading.Thread(target=lambda: posted.append(_pay(books, "P-LONG", acct, 2_000).amount_fen))
        t.start()
        _wait_for_a_lock_wait(engine)
        time.sleep(1.0)  # past the failed call's 0.5 s bound: the pay must still be waiting, not failed
        holder.rollback()
        t.join(timeout=30)
    assert posted == [2_000]
    assert _paid(engine, acct) == [("P-0", 1_000), ("P-LONG", 2_000)]


def test_kept_connections_stay_within_the_pool_size_and_close_with_the_engine(books: AdapterContext) -> None:
    engine = books.router.primary
    accts = [add_account(engine, "01", i, BILLS) for i in range(1, 9)]
    errors: list[BaseException] = []

    def payer(k: int) -> None:
        try:
            for j in range(15):
                _pay(books, f"P-{k}-{j}", accts[k], 10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=payer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    kept_pool = pay_pg.kept_connections(engine)
    assert kept_pool is not None and 1 <= kept_pool.open_count <= POOL
    assert sum(len(_paid(engine, a)) for a in accts) == 8 * 15
    admin = _admin(engine)
    try:
        def pays_connections() -> int:
            with admin.connect() as conn:
                return int(conn.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'mis_adapter'")).scalar_one())
        assert pays_connections() <= 2 * POOL
        engine.dispose()
        for _ in range(2_000):
            if pays_connections() == 0:
                break
            time.sleep(0.005)
        assert pays_connections() == 0
    finally:
        admin.dispose()


# ---- the libpq path's text forms against psycopg's own adaptation ----
_TEXTS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
_BIGINTS = st.integers(-(2**63), 2**63 - 1)
_DATES = st.dates(dt.date(1, 1, 1), dt.date(9999, 12, 31))
_STAMPS = st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(9000, 1, 1),
                       timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=8)),
                                                  dt.timezone(dt.timedelta(hours=-3, minutes=-30))]))
_ROW_SQL = ("SELECT $1::text, $2::bigint, $3::text, $4::date, $5::bigint, $6::bigint, $7::text, $8::text, "
            "$9::timestamptz")


@pytest.fixture(scope="module")
def pg_conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[psycopg.Connection[Any]]:
    with fresh_database("postgresql", tmp_path_factory.mktemp("kept")) as url:
        conn = psycopg.connect(sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
                               autocommit=True)
        try:
            yield conn
        finally:
            conn.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.tuples(_TEXTS, st.none() | _BIGINTS, st.none() | _TEXTS, st.none() | _DATES, st.none() | _BIGINTS,
                     st.none() | _BIGINTS, st.none() | _TEXTS, st.none() | _TEXTS, _STAMPS))
def test_text_forms_equal_psycopgs_adaptation(pg_conn: psycopg.Connection[Any], row: tuple[Any, ...]) -> None:
    """Parameters sent in pay_pg's text form arrive as psycopg would send them, and yd_pay's columns read
    back in text form (pay_called_of_text) equal psycopg's loading of the same row."""
    typed = psycopg.RawCursor(pg_conn).execute(_ROW_SQL, row).fetchone()
    assert typed is not None
    pgconn = pg_conn.pgconn
    pgconn.send_query_params(_ROW_SQL.encode(), [pay_pg._text_param(v, "utf-8") for v in row])
    (res,) = pg_conn.wait(psycopg.generators.execute(pgconn))
    values = [res.get_value(0, i) for i in range(res.nfields)]
    assert tuple(pay_pg.pay_called_of_text(values[:8], "utf-8")) == typed[:8] == row[:8]
    assert typed[8] == row[8]


def _kept_bound(engine: sa.Engine) -> tuple[int, str, str]:
    """The one free kept connection's backend pid and its session's lock and statement bounds."""
    kept_pool = pay_pg.kept_connections(engine)
    assert kept_pool is not None and len(kept_pool._free) == 1
    raw = kept_pool._free[0].raw
    with raw.cursor() as cur:
        lock, statement = cur.execute("SELECT current_setting('lock_timeout'), "
                                      "current_setting('statement_timeout')").fetchone() or ("", "")
    return raw.info.backend_pid, lock, statement


def test_pays_whose_bounds_straddle_a_step_keep_one_bound_and_a_shorter_pay_gets_its_own(
        books: AdapterContext) -> None:
    """Deadlines jittering across a 250 ms step do not re-send the kept connection's bound (kept while
    it is no longer than a pay allows and less than 500 ms shorter); a pay allowing less than the kept
    bound waits on a held row lock only as long as its own bound allows: DB_TIMEOUT, nothing written."""
    engine = books.router.primary
    acct = add_account(engine, "01", 1, BILLS)
    _pay(books, "P-1", acct, time_left_s=2.45)  # allows 2,350 ms: 2,250 sent
    pid, lock, statement = _kept_bound(engine)
    assert (lock, statement) == ("2250ms", "2250ms")
    _pay(books, "P-2", acct, time_left_s=2.72)  # allows 2,620 ms (its own step 2,500): 2,250 kept
    assert _kept_bound(engine) == (pid, "2250ms", "2250ms")
    _pay(books, "P-3", acct, time_left_s=2.40)  # allows 2,300 ms: 2,250 kept
    assert _kept_bound(engine) == (pid, "2250ms", "2250ms")
    assert _paid(engine, acct) == [("P-1", 1_000), ("P-2", 1_000), ("P-3", 1_000)]

    with _account_locked(engine, acct):
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as refused:
            _pay(books, "P-SHORT", acct, time_left_s=1.9)  # allows 1,800 ms: its own 1,750, not the kept 2,250
        waited_s = time.monotonic() - t0
    assert refused.value.reason == "DB_TIMEOUT"
    assert waited_s < 2.2  # the kept 2.25 s bound would have waited past this
    assert _paid(engine, acct) == [("P-1", 1_000), ("P-2", 1_000), ("P-3", 1_000)]
