"""db_watch: a socket still registered when it is due is shut down by the watch thread (its peer reads
the end of the stream); one unregistered in time is never touched, even once its due time has passed; a
pooled connection it shut is never handed to the next call."""
from __future__ import annotations

import socket
import time

import sqlalchemy as sa

from tests.support.waiting import wait_until
from yindian_common import db_watch
from yindian_common.db import make_engine


def test_a_socket_past_due_is_shut_and_one_unregistered_in_time_is_not() -> None:
    kept_a, kept_b = socket.socketpair()
    cut_a, cut_b = socket.socketpair()
    try:
        now = time.monotonic()
        token = db_watch.register(kept_a.fileno(), now + 0.05)
        db_watch.unregister(token)  # the call answered in time
        db_watch.register(cut_a.fileno(), now + 0.05)
        cut_b.settimeout(5.0)
        assert cut_b.recv(16) == b""  # shut down by the watch thread: the end of the stream
        wait_until(lambda: time.monotonic() > now + 0.05, "both due times passed")
        kept_a.sendall(b"still here")
        kept_b.settimeout(5.0)
        assert kept_b.recv(16) == b"still here"
    finally:
        for s in (kept_a, kept_b, cut_a, cut_b):
            s.close()


def test_a_connection_cut_after_its_last_statement_is_not_handed_to_the_next_call(pg_url: str) -> None:
    """The watch may shut a call's connection after its last statement but before the pool takes it back
    (its checkin is what unregisters it): the pool must not hand that connection to the next call, which
    would fail on a database that is up. Seen in CI: a branch pay's lock-wait test, whose next read on the
    same engine got "server closed the connection unexpectedly". (PostgreSQL: there a transaction ended by
    the call leaves nothing for the pool to roll back on the way in, so the shut socket goes unnoticed;
    PyMySQL's pool reset finds it.)"""
    engine = make_engine(pg_url, pool_size=1)
    try:
        cuts = db_watch.overdue_cuts()
        with db_watch.calls_due(time.monotonic() + 0.05):
            conn = engine.connect()
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
            conn.commit()  # the call's last statement, its transaction ended
            wait_until(lambda: db_watch.overdue_cuts() > cuts, "the watch to cut the call's connection")
            conn.close()  # back to the pool
        with engine.connect() as nxt:  # the next call, on the one pooled connection
            assert nxt.execute(sa.text("SELECT 2")).scalar_one() == 2
    finally:
        engine.dispose()
