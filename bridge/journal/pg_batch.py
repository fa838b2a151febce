"""PostgreSQL: one group commit of the journal as ONE statement.

New rows (insert-or-ignore, returning the keys inserted), outcomes (the
row updates) and their audit lines go in one round trip as unnest() arrays,
one array per column, in a statement whose text never changes, so psycopg
prepares it once (BASELINES.md: one statement instead of several gives
2.2-2.3x; SQLAlchemy's per-row parameter processing is the biggest Python
cost of a journal write). The column list is the schema's (bridge.journal.schema),
so a column added there is carried here without editing this module.

Used only when a batch has at most one outcome per row and no outcome for a
row inserted in the same batch (data-modifying CTEs share one snapshot); the
writer's claims make that the normal case, and the caller falls back to the
generic path otherwise."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from bridge.journal.records import Entry, Outcome
from bridge.journal.schema import audit, requests, utc

# (name in the outcome arrays, the journal/audit column whose type it has)
_OUTCOME_FIELDS = (("kind", requests.c.kind), ("serial", requests.c.serial), ("bank_id", requests.c.bank_id),
                   ("amount_fen", requests.c.amount_fen), ("state", requests.c.state),
                   ("status_code", requests.c.status_code), ("body", requests.c.body),
                   ("message", requests.c.message), ("reversal_serial", requests.c.reversal_serial),
                   ("attempts", requests.c.attempts), ("next_attempt_ms", requests.c.next_attempt_ms),
                   ("at", audit.c.at))


def _array_type(column: sa.Column[Any]) -> str:
    return f"{column.type.compile(dialect=postgresql.dialect())}[]"


class PgBatch:
    """The three statement texts (rows, outcomes, both), built once."""

    def __init__(self) -> None:
        cols = [c.name for c in requests.columns]
        self._cols = cols
        rows_in = ", ".join(f"%(r_{c})s::{_array_type(requests.c[c])}" for c in cols)
        insert = (f"INSERT INTO {requests.name} ({', '.join(cols)}) SELECT * FROM unnest({rows_in}) "
                  "ON CONFLICT (kind, serial) DO NOTHING RETURNING kind, serial")
        names = [n for n, _ in _OUTCOME_FIELDS]
        outcomes_in = ", ".join(f"%(o_{n})s::{_array_type(c)}" for n, c in _OUTCOME_FIELDS)
        o = f"o AS (SELECT * FROM unnest({outcomes_in}) WITH ORDINALITY AS u({', '.join(names)}, n))"
        update = (f"u AS (UPDATE {requests.name} j SET state = o.state, status_code = o.status_code, body = o.body, "
                  "message = o.message, reversal_serial = o.reversal_serial, attempts = o.attempts, "
                  "next_attempt_ms = o.next_attempt_ms, updated_at = o.at FROM o "
                  "WHERE j.kind = o.kind AND j.serial = o.serial)")
        lines = (f"INSERT INTO {audit.name} (at, kind, serial, bank_id, amount_fen, state, status_code, detail) "
                 "SELECT at, kind, serial, bank_id, amount_fen, state, status_code, message FROM o ORDER BY n")
        self.rows_only = insert
        self.outcomes_only = f"WITH {o}, {update} {lines}"
        self.both = f"WITH ins AS ({insert}), {o}, {update}, a AS ({lines}) SELECT kind, serial FROM ins"

    @staticmethod
    def fits(entries: Sequence[Entry], outcomes: Sequence[Outcome]) -> bool:
        keys = {o.key for o in outcomes}
        return len(keys) == len(outcomes) and not any(e.key in keys for e in entries)

    def write(self, conn: sa.Connection, entries: Sequence[Entry], outcomes: Sequence[Outcome]
              ) -> set[tuple[str, str]]:
        """Inside the caller's transaction on `conn`; returns the keys inserted."""
        params: dict[str, Any] = {}
        if entries:
            rows = [e.row() for e in entries]
            for c in self._cols:
                params[f"r_{c}"] = [r[c] for r in rows]
        if outcomes:
            for name, _col in _OUTCOME_FIELDS:
                params[f"o_{name}"] = [utc(o.at) for o in outcomes] if name == "at" else \
                    [getattr(o, name) for o in outcomes]
        sql = self.both if entries and outcomes else self.rows_only if entries else self.outcomes_only
        cur = conn.connection.cursor()
        try:
            cur.execute(sql, params)
            return {(r[0], r[1]) for r in cur.fetchall()} if entries else set()
        finally:
            cur.close()
