"""PostgreSQL: one group commit of the journal as ONE statement.

New rows (insert-or-ignore, returning the keys inserted), outcomes (the
row updates) and their audit lines go in one round trip, each part as one
JSON parameter, in a statement whose text never changes, so psycopg
prepares it once (BASELINES.md: one statement instead of several gives
2.2-2.3x; SQLAlchemy's per-row parameter processing is the biggest Python
cost of a journal write). The column list is the schema's (bridge.journal.schema),
so a column added there is carried here without editing this module.

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
    (json_populate_recordset), so the column list is the schema's and psycopg
    dumps one string instead of an array per column (its list dumpers scan every
    list twice to pick a type: the biggest cost of an array-per-column batch)."""

    def __init__(self) -> None:
        cols = [c.name for c in requests.columns]
        self._cols = cols
        self._values = operator.attrgetter(*cols)
        table = requests.name
        insert = (f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} "
                  f"FROM json_populate_recordset(NULL::{table}, %(rows)s::json) "
                  "ON CONFLICT (kind, serial) DO NOTHING RETURNING kind, serial")
        # The outcomes go through an array so that the planner counts them as few (unnest of a
        # non-constant array: 10 rows) and updates the rows they name by primary key. Read straight
        # from json_populate_recordset they counted as 100 (its fixed estimate) and, while the
        # journal's statistics lag behind its size, the plan hashed the whole journal (a sequential
        # scan per group commit: half the journal backend's CPU under bench-ratio, growing with it).
        o = (f"o AS (SELECT * FROM unnest(ARRAY(SELECT json_populate_recordset(NULL::{table}, "
             "%(outcomes)s::json))) WITH ORDINALITY AS r)")
        update = (f"u AS (UPDATE {table} j SET state = o.state, status_code = o.status_code, body = o.body, "
                  "message = o.message, reversal_serial = o.reversal_serial, attempts = o.attempts, "
                  "next_attempt_ms = o.next_attempt_ms, updated_at = o.updated_at FROM o "
                  "WHERE j.kind = o.kind AND j.serial = o.serial)")
        lines = (f"INSERT INTO {audit.name} (at, kind, serial, bank_id, amount_fen, state, status_code, detail) "
                 "SELECT updated_at, kind, serial, bank_id, amount_fen, state, status_code, message FROM o "
                 "ORDER BY ordinality")
        self.rows_only = insert
        self.outcomes_only = f"WITH {o}, {update} {lines}"
        self.both = f"WITH ins AS ({insert}), {o}, {update}, a AS ({lines}) SELECT kind, serial FROM ins"

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
        """The group commit on `conn` (idle: no transaction open), as one statement in autocommit;
        returns the keys inserted. One statement is one transaction on PostgreSQL, all of its parts
        or none, committed (and flushed) before its answer comes back: so BEGIN and COMMIT, each a
        round trip of its own under psycopg, are not sent (3 round trips per group commit -> 1).
        Driver errors come back as SQLAlchemy's DBAPIError, as a statement run through SQLAlchemy
        would raise them (the writer retries on a new connection)."""
        params: dict[str, str] = {}
        # The values JSON lacks (instants, the business date, bytes) are put in their text form here, not by a
        # json.dumps default= callback: a Python call per value from the C encoder cost more than the encoding.
        if entries:
            params["rows"] = json.dumps([self._row(e) for e in entries], default=_json_value)
        if outcomes:
            params["outcomes"] = json.dumps([self._outcome(o) for o in outcomes], default=_json_value)
        sql = self.both if entries and outcomes else self.rows_only if entries else self.outcomes_only
        raw: Any = conn.connection.driver_connection  # a psycopg connection: this module is PostgreSQL's
        try:
            raw.autocommit = True
            try:
                with raw.cursor() as cur:
                    cur.execute(sql, params)
                    return {(r[0], r[1]) for r in cur.fetchall()} if entries else set()
            finally:
                if not (raw.closed or raw.broken):
                    raw.autocommit = False
        except psycopg.Error as exc:
            raise DBAPIError.instance(sql, params, exc, psycopg.Error) from exc
