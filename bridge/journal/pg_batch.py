"""PostgreSQL: one group commit of the journal as ONE statement.

New rows (insert-or-ignore, returning the keys inserted), outcomes (the
row updates) and their audit lines go in one round trip, each part as one
JSON parameter, in a statement whose text never changes, prepared once per
connection and sent straight on libpq (BASELINES.md: one statement instead
of several gives 2.2-2.3x; SQLAlchemy's per-row parameter processing is the
biggest Python cost of a journal write). The column list is the schema's
(bridge.journal.schema), so a column added there is carried here without
editing this module.

Used only when a batch has at most one outcome per row and no outcome for a
row inserted in the same batch (data-modifying CTEs share one snapshot); the
writer's claims make that the normal case, and the caller falls back to the
generic path otherwise."""
from __future__ import annotations

import datetime as dt
import json
import operator
from collections.abc import Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from bridge.journal.records import Entry, Outcome
from bridge.journal.schema import audit, requests, utc
from yindian_common.libpq import raise_error

_TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK
_COMMAND_OK = psycopg.pq.ExecStatus.COMMAND_OK
_FATAL_ERROR = psycopg.pq.ExecStatus.FATAL_ERROR
_IDLE = psycopg.pq.TransactionStatus.IDLE
_UNKNOWN = psycopg.pq.TransactionStatus.UNKNOWN
# The three statements' prepared names on a connection (psycopg's own are _pg3_*), and the key under which a
# pooled connection's record notes that they are prepared on it and its encoding (SQLAlchemy clears a record's
# info when its DBAPI connection is replaced, so a new connection prepares them again).
_ROWS_NAME, _OUTCOMES_NAME, _BOTH_NAME = b"yd_journal_rows", b"yd_journal_outcomes", b"yd_journal_both"
_PREPARED_INFO = "yindian.journal_batch_encoding"


def _json_value(value: Any) -> Any:
    """A value JSON has no type for, as PostgreSQL's input function for its column reads it from JSON text."""
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if isinstance(value, dt.datetime):
        return utc(value).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(f"no JSON form for a journal value of type {type(value).__name__}")


class PgBatch:
    """The three statement texts (rows, outcomes, both), built once. Each batch is
    one JSON parameter per part, read back with the journal table's own row type
    (json_populate_recordset), so the column list is the schema's and one text
    parameter goes instead of an array per column (psycopg's list dumpers scanned
    every list twice to pick a type: the biggest cost of an array-per-column batch)."""

    def __init__(self) -> None:
        cols = [c.name for c in requests.columns]
        self._cols = cols
        self._values = operator.attrgetter(*cols)
        table = requests.name
        insert = (f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} "
                  f"FROM json_populate_recordset(NULL::{table}, $1::json) "
                  "ON CONFLICT (kind, serial) DO NOTHING RETURNING kind, serial")
        # The outcomes go through an array so that the planner counts them as few (unnest of a
        # non-constant array: 10 rows) and updates the rows they name by primary key. Read straight
        # from json_populate_recordset they counted as 100 (its fixed estimate) and, while the
        # journal's statistics lag behind its size, the plan hashed the whole journal (a sequential
        # scan per group commit: half the journal backend's CPU under bench-ratio, growing with it).
        o = (f"o AS (SELECT * FROM unnest(ARRAY(SELECT json_populate_recordset(NULL::{table}, "
             "$@::json))) WITH ORDINALITY AS r)")  # $@: the outcomes' parameter, $1 alone, $2 after the rows
        update = (f"u AS (UPDATE {table} j SET state = o.state, status_code = o.status_code, body = o.body, "
                  "message = o.message, reversal_serial = o.reversal_serial, attempts = o.attempts, "
                  "next_attempt_ms = o.next_attempt_ms, updated_at = o.updated_at FROM o "
                  "WHERE j.kind = o.kind AND j.serial = o.serial)")
        lines = (f"INSERT INTO {audit.name} (at, kind, serial, bank_id, amount_fen, state, status_code, detail) "
                 "SELECT updated_at, kind, serial, bank_id, amount_fen, state, status_code, message FROM o "
                 "ORDER BY ordinality")
        self.rows_only = insert
        self.outcomes_only = f"WITH {o}, {update} {lines}".replace("$@", "$1")
        self.both = f"WITH ins AS ({insert}), {o}, {update}, a AS ({lines}) SELECT kind, serial FROM ins".replace(
            "$@", "$2")
        self._prepare = ((_ROWS_NAME, self.rows_only.encode()), (_OUTCOMES_NAME, self.outcomes_only.encode()),
                         (_BOTH_NAME, self.both.encode()))

    # The writer's own connection plans its batch statements with these (set once per connection,
    # never per batch): an outcome updates its row by primary key whatever the journal's statistics
    # say. Left to the estimates, a journal of a few thousand rows whose statistics lagged was
    # hashed whole by a sequential scan at every group commit (perf under bench-ratio: half the
    # journal backend's CPU); its keyed plan needs no scan and no join but the nested loop.
    # It also names itself in pg_stat_activity (the pool's other connections are 'bridge'), so that
    # bench-ratio and an operator see the journal writer's backend apart.
    WRITER_SESSION = ("SET enable_seqscan = off", "SET enable_hashjoin = off", "SET enable_mergejoin = off",
                      "SET application_name = 'bridge/journal-writer'")
    WRITER_SESSION_RESET = ("RESET enable_seqscan", "RESET enable_hashjoin", "RESET enable_mergejoin",
                            "RESET application_name")

    def _row(self, e: Entry) -> dict[str, Any]:
        # A key left out reads as NULL in json_populate_recordset, exactly as a JSON null does: the None
        # values are dropped (less to build and to encode), the rest is read in one attrgetter call.
        out = {c: v for c, v in zip(self._cols, self._values(e), strict=True) if v is not None}
        created = utc(e.created_at).isoformat()
        out["created_at"] = created
        out["updated_at"] = created if e.updated_at is e.created_at else utc(e.updated_at).isoformat()
        out["business_date"] = e.business_date.isoformat()
        if e.body is not None:
            out["body"] = "\\x" + e.body.hex()
        return out

    @staticmethod
    def _outcome(o: Outcome) -> dict[str, Any]:
        return {"kind": o.kind, "serial": o.serial, "bank_id": o.bank_id, "amount_fen": o.amount_fen, "state": o.state,
                "status_code": o.status_code, "body": None if o.body is None else "\\x" + o.body.hex(),
                "message": o.message, "reversal_serial": o.reversal_serial, "attempts": o.attempts,
                "next_attempt_ms": o.next_attempt_ms, "updated_at": utc(o.at).isoformat()}

    @staticmethod
    def fits(entries: Sequence[Entry], outcomes: Sequence[Outcome]) -> bool:
        keys = {o.key for o in outcomes}
        return len(keys) == len(outcomes) and not any(e.key in keys for e in entries)

    def write(self, conn: sa.Connection, entries: Sequence[Entry], outcomes: Sequence[Outcome]
              ) -> set[tuple[str, str]]:
        """The group commit on `conn` (idle: no transaction open), as one statement; returns the keys
        inserted. One statement sent outside a transaction is one transaction on PostgreSQL, all of its
        parts or none, committed (and flushed) before its answer comes back: so no BEGIN and COMMIT (3
        round trips per group commit -> 1), and no autocommit switch either (psycopg opens a transaction
        only when its cursor sends a statement; this one goes straight on libpq, as mis_adapter's kept
        connections send the pay: one Bind/Execute/Sync with the JSON in text form, the keys read back in
        text form, no cursor's parameter adaptation or prepared-statement bookkeeping).
        Driver errors come back as SQLAlchemy's DBAPIError, as a statement run through SQLAlchemy
        would raise them (the writer retries on a new connection)."""
        # The values JSON lacks (instants, the business date, bytes) are put in their text form here, not by a
        # json.dumps default= callback: a Python call per value from the C encoder cost more than the encoding.
        rows = json.dumps([self._row(e) for e in entries], default=_json_value) if entries else ""
        outs = json.dumps([self._outcome(o) for o in outcomes], default=_json_value) if outcomes else ""
        if entries and outcomes:
            name, sql, params = _BOTH_NAME, self.both, [rows.encode(), outs.encode()]
        elif entries:
            name, sql, params = _ROWS_NAME, self.rows_only, [rows.encode()]
        else:
            name, sql, params = _OUTCOMES_NAME, self.outcomes_only, [outs.encode()]
        try:
            res = self._run(conn, name, params, _TUPLES_OK if entries else _COMMAND_OK)
            if not entries:
                return set()
            enc, value = conn.connection.info[_PREPARED_INFO], res.get_value
            return {(value(i, 0).decode(enc), value(i, 1).decode(enc)) for i in range(res.ntuples)}
        except psycopg.Error as exc:
            raise DBAPIError.instance(sql, params, exc, psycopg.Error) from exc

    def _run(self, conn: sa.Connection, name: bytes, params: list[bytes], status: Any) -> Any:
        """The prepared statement `name` with `params` (text form) on `conn`'s psycopg connection, prepared
        first if this connection has not prepared it yet; its one result, or psycopg's error raised.
        Each is one blocking libpq call (PQexecPrepared) during which the interpreter lock is released once:
        psycopg's non-blocking wait (send, poll, read, is-busy) releases and takes it back several times a
        statement, and in the bridge, with its many threads, each taking back can wait its turn."""
        raw: Any = conn.connection.driver_connection  # a psycopg connection: this module is PostgreSQL's
        pgconn = raw.pgconn
        status_now = pgconn.transaction_status
        if status_now != _IDLE:
            if status_now == _UNKNOWN:  # the connection is lost (as psycopg's cursor would say)
                raise psycopg.OperationalError("the connection is lost")
            # Inside a transaction the statement would not commit: a bug of the caller (Journal.write checks).
            raise psycopg.ProgrammingError(f"a journal group commit needs an idle connection, not "
                                           f"{psycopg.pq.TransactionStatus(status_now).name}")
        info = conn.connection.info
        encoding = info.get(_PREPARED_INFO)
        if encoding is None:
            encoding = raw.info.encoding
            for prep_name, text in self._prepare:
                _checked(pgconn, pgconn.prepare(prep_name, text), _COMMAND_OK, encoding)
            info[_PREPARED_INFO] = encoding
        return _checked(pgconn, pgconn.exec_prepared(name, params), status, encoding)


def _checked(pgconn: Any, res: Any, status: Any, encoding: str) -> Any:
    """`res` if its status is `status`, else its error raised as psycopg's cursor would raise it: a server
    error as its class by SQLSTATE; a connection lost without one (libpq's "server closed the connection
    unexpectedly") as OperationalError."""
    if res.status == _FATAL_ERROR:
        raise_error(pgconn, res, encoding)
    if res.status != status:
        raise psycopg.errors.InternalError(f"unexpected answer to a journal group commit: {res.status}")
    return res
