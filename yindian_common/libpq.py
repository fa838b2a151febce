"""Statements sent straight on libpq (a psycopg connection's `pgconn`), outside psycopg's cursor: the
bridge's journal group commit and mis_adapter's kept pay call. Their failed results are raised here as
psycopg's cursor raises them, so that both read a lost connection the same way."""
from __future__ import annotations

from typing import Any, NoReturn

import psycopg

BAD = psycopg.pq.ConnStatus.BAD  # libpq lost the connection


def raise_error(pgconn: Any, res: Any, encoding: str) -> NoReturn:
    """A failed result's error, as psycopg's cursor raises it: a server error as its class by SQLSTATE; a
    connection lost without one (libpq's "server closed the connection unexpectedly") as OperationalError."""
    err = psycopg.errors.error_from_result(res, encoding=encoding)
    if pgconn.status == BAD and not isinstance(err, psycopg.OperationalError):
        raise psycopg.OperationalError(str(err)) from err
    raise err
