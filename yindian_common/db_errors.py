"""The one translation of database trouble into an expected refusal: a pool
that stays exhausted past its timeout, or a database that is down or drops
the connection, becomes UNAVAILABLE (nothing was written; the caller may
retry the same serial). Any other database error is a bug and passes on."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from yindian_common.errors import Unavailable

P = ParamSpec("P")
R = TypeVar("R")

POOL_EXHAUSTED = "DB_POOL_EXHAUSTED"
DB_UNAVAILABLE = "DB_UNAVAILABLE"


@contextmanager
def db_errors(what: str = "branch database") -> Iterator[None]:
    """Raises Unavailable for a pool timeout or an OperationalError inside the block."""
    try:
        yield
    except (PoolTimeout, OperationalError) as exc:
        raise translated(exc, what) from exc


def db_call(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` with database trouble translated (see db_errors).
    A plain try, not the context manager: it wraps every Pay."""
    try:
        return fn(*args, **kwargs)
    except (PoolTimeout, OperationalError) as exc:
        raise translated(exc) from exc


def translated(exc: PoolTimeout | OperationalError, what: str = "branch database") -> Unavailable:
    if isinstance(exc, PoolTimeout):
        return Unavailable("database connection pool exhausted", reason=POOL_EXHAUSTED)
    return Unavailable(f"{what} unavailable", reason=DB_UNAVAILABLE)
