"""Database round trips given up at their caller's deadline, whatever the link does.

The server-side bounds (lock and statement timeouts: db.bound_waits, Pay's kept sessions) end the waits
of a server that still answers; TCP gives a dead link up DB_LINK_DEAD_S after its last segment
(db.link_bound_args). A money call whose deadline comes first needs a bound of its own: it registers
its connection's socket with the moment its answer is due, and one watch thread per process shuts down,
every WATCH_PERIOD_S, the socket of a registration past due. The driver then reports the connection lost
(libpq, PyMySQL), which the caller answers as it answers any link that broke: nothing written before a
COMMIT was sent, in doubt (COMMIT_IN_DOUBT) after.

A registration is made and removed under one lock, and a socket is shut only under that lock while still
registered, so a connection handed back (its descriptor perhaps reused) is never touched.

Two ways in: `register(fd, due)` and `unregister` around one blocking round trip (Pay's kept PostgreSQL
connections), and `calls_due(due)`, under which every connection an engine of db.make_engine checks out of
its pool is registered until it is checked in (Pay on the pool, Cancel; `watch_pool`), and a connection it
opens meanwhile waits for the server no longer than the call may. A pooled connection shut after its call's
last statement, before its checkin, is replaced at its next checkout."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine

log = logging.getLogger("yindian.db_watch")

# How often the watch thread looks for registrations past due, and how long it stays without any before
# it ends (the next registration starts it again).
WATCH_PERIOD_S = 0.025
WATCH_IDLE_END_S = 1.0
# The shortest connection attempt a due time leaves a new connection (libpq counts whole seconds, two at least).
CONNECT_TIMEOUT_MIN_S = 2

_lock = threading.Lock()
# registration -> (socket descriptor, due on time.monotonic(), the pool record's info of a pooled connection)
_due: dict[int, tuple[int, float, dict[str, Any] | None]] = {}
_next = 0
_thread: threading.Thread | None = None
_CALL_DUE: contextvars.ContextVar[float] = contextvars.ContextVar("yindian_db_call_due", default=0.0)
_RECORD_KEY = "yindian.db_watch"
_CUT_KEY = "yindian.db_watch.cut"
T = TypeVar("T")


def register(fd: int, due: float, record_info: dict[str, Any] | None = None) -> int:
    """Watches socket `fd` until `unregister`: shut down if still registered at `due` (time.monotonic()).
    `record_info` (a pooled connection's): marked when its socket is shut, for watch_pool."""
    global _next, _thread
    with _lock:
        _next += 1
        _due[_next] = (fd, due, record_info)
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="db-watch", daemon=True)
            _thread.start()
        return _next


def unregister(token: int) -> None:
    with _lock:
        _due.pop(token, None)


class calls_due:  # noqa: N801 - used as a function: `with calls_due(due):`
    """Every connection checked out of a watched pool (watch_pool) in this scope is due at `due`
    (time.monotonic(); 0: not watched). A class, not a generator context manager: it wraps every Pay."""
    __slots__ = ("_due", "_reset")

    def __init__(self, due: float) -> None:
        self._due = due

    def __enter__(self) -> None:
        self._reset = _CALL_DUE.set(self._due)

    def __exit__(self, *_exc: object) -> None:
        _CALL_DUE.reset(self._reset)


def read_by(pages: Iterator[T], due: float) -> Iterator[T]:
    """`pages` (a generator reading from the database), each read with its round trips due at `due`
    (calls_due; 0: unwatched). The scope never spans a yield: grpcio may ask a stream for its next message
    in another context."""
    while True:
        with calls_due(due):
            page = next(pages, None)
        if page is None:
            return
        yield page


def overdue_cuts() -> int:
    """Sockets shut so far for want of an answer by their due time (for tests and metrics)."""
    return _cuts


_cuts = 0


def _watch() -> None:
    global _thread, _cuts
    idle_since = time.monotonic()
    while True:
        time.sleep(WATCH_PERIOD_S)
        now = time.monotonic()
        with _lock:
            if not _due:
                if now - idle_since >= WATCH_IDLE_END_S:
                    _thread = None
                    return
                continue
            idle_since = now
            late = [token for token, (_fd, due, _info) in _due.items() if due <= now]
            for token in late:
                fd, _, info = _due.pop(token)
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)  # the socket itself, through a duplicate descriptor
                if info is not None:
                    info[_CUT_KEY] = True
                _cuts += 1
        for _token in late:
            log.warning("event=db_answer_overdue action=connection_cut")


def socket_of(dbapi_conn: Any) -> int | None:
    """The descriptor of a DBAPI connection's socket: psycopg (libpq) or PyMySQL; None for SQLite or a
    connection without one."""
    pgconn = getattr(dbapi_conn, "pgconn", None)
    if pgconn is not None:
        try:
            return int(pgconn.socket)
        except Exception:  # noqa: BLE001 - a closed libpq connection has no socket
            return None
    sock = getattr(dbapi_conn, "_sock", None)
    return None if sock is None else int(sock.fileno())


def watch_pool(engine: Engine) -> None:
    """Registers each connection `engine` checks out under calls_due (a due time set) until it is
    checked in, invalidated, detached or closed, whichever comes first (never past the life of its socket)."""

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        """A connection opened under calls_due waits for the server no longer than the call may: on a dead
        link an attempt otherwise takes the engine's whole connect_timeout (DB_CONNECT_TIMEOUT_S), whatever
        the caller's deadline. Whole seconds, CONNECT_TIMEOUT_MIN_S at least (libpq's floor)."""
        due, timeout = _CALL_DUE.get(), cparams.get("connect_timeout")
        if due and timeout is not None:
            cparams["connect_timeout"] = min(int(timeout), max(CONNECT_TIMEOUT_MIN_S, int(due - time.monotonic())))

    @event.listens_for(engine, "checkout")
    def _out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if record.info.pop(_CUT_KEY, False):
            # Shut after its call's last statement, before the pool took it back (a transaction the call
            # ended leaves the pool nothing to roll back, so nothing noticed): the pool replaces it.
            raise exc.DisconnectionError("its socket was shut by db_watch")
        due = _CALL_DUE.get()
        if due:
            fd = socket_of(dbapi_conn)
            if fd is not None and fd >= 0:
                record.info[_RECORD_KEY] = register(fd, due, record.info)

    def _release(record: Any) -> None:
        token = record.info.pop(_RECORD_KEY, None)
        if token is not None:
            unregister(token)

    event.listen(engine, "checkin", lambda _dbapi_conn, record: _release(record))
    event.listen(engine, "invalidate", lambda _dbapi_conn, record, _exc: _release(record))
    event.listen(engine, "soft_invalidate", lambda _dbapi_conn, record, _exc: _release(record))
    event.listen(engine, "detach", lambda _dbapi_conn, record: _release(record))
    event.listen(engine, "close", lambda _dbapi_conn, record: _release(record))
