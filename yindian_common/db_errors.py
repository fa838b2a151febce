"""The one translation of database trouble into an expected refusal: a pool
that stays exhausted past its timeout, or a database that is down, drops the
connection or makes a statement wait past its bound, becomes UNAVAILABLE.
Before COMMIT nothing was written (reason DB_UNAVAILABLE, DB_TIMEOUT or
DB_POOL_EXHAUSTED: the caller may retry the same serial); trouble at or after
COMMIT is in doubt (reason COMMIT_IN_DOUBT: the caller asks GetPayment). Any
other database error is a bug and passes on."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from yindian_common.errors import Unavailable

P = ParamSpec("P")
R = TypeVar("R")

POOL_EXHAUSTED = "DB_POOL_EXHAUSTED"
DB_UNAVAILABLE = "DB_UNAVAILABLE"
DB_TIMEOUT = "DB_TIMEOUT"
COMMIT_IN_DOUBT = "COMMIT_IN_DOUBT"

# What "database trouble" is: the pool timing out, the server refusing or dropping the
# connection (OperationalError; PyMySQL raises InterfaceError on a connection the server
# killed), or any driver error after which SQLAlchemy invalidated the connection.
DB_TROUBLE: tuple[type[Exception], ...] = (PoolTimeout, DBAPIError)

# SQLSTATEs / MariaDB error numbers of a statement ended by its time bound.
_TIMEOUT_SQLSTATES = frozenset({"57014", "55P03", "25P03"})   # query_canceled, lock_not_available, idle-in-tx
_TIMEOUT_MYSQL_ERRNOS = frozenset({1205, 1969, 3024})          # lock wait, max_statement_time (MariaDB, MySQL)


def is_trouble(exc: BaseException) -> bool:
    """True for the database trouble that is an operating error, not a bug."""
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


@contextmanager
def db_errors(what: str = "branch database") -> Iterator[None]:
    """Raises Unavailable for database trouble inside the block."""
    try:
        yield
    except DB_TROUBLE as exc:
        if not is_trouble(exc):
            raise
        raise translated(exc, what) from exc


def db_call(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` with database trouble translated (see db_errors).
    A plain try, not the context manager: it wraps every Pay."""
    try:
        return fn(*args, **kwargs)
    except DB_TROUBLE as exc:
        if not is_trouble(exc):
            raise
        raise translated(exc) from exc


def commit_or_doubt(conn: Connection) -> None:
    """COMMIT the connection's transaction. Trouble now is in doubt: the server
    may have committed before the reply was lost (COMMIT_IN_DOUBT)."""
    try:
        conn.commit()
    except DB_TROUBLE as exc:
        if not is_trouble(exc):
            raise
        raise Unavailable("the database connection broke during COMMIT: the outcome is unknown, ask GetPayment",
                          reason=COMMIT_IN_DOUBT) from exc


def _timed_out(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None)
    if state in _TIMEOUT_SQLSTATES:
        return True
    args = getattr(orig, "args", ())
    if args and args[0] in _TIMEOUT_MYSQL_ERRNOS:
        return True
    return "database is locked" in str(orig)  # SQLite: the busy timeout ran out


def translated(exc: BaseException, what: str = "branch database") -> Unavailable:
    if isinstance(exc, PoolTimeout):
        return Unavailable("database connection pool exhausted", reason=POOL_EXHAUSTED)
    if _timed_out(exc):
        return Unavailable(f"{what} did not answer within the call's deadline; nothing was written",
                           reason=DB_TIMEOUT)
    return Unavailable(f"{what} unavailable", reason=DB_UNAVAILABLE)
