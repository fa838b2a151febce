"""The journal repository: statements built once, one INSERT per new
request, outcomes recorded with their audit lines."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bridge.journal.pg_batch import PgBatch
from bridge.journal.records import Entry, Outcome
from bridge.journal.schema import (
    CANCEL,
    IN_DOUBT_STATES,
    PAY,
    PENDING,
    RETRYABLE,
    REVERSING,
    SUSPECT,
    audit,
    in_states,
    kind_is,
    requests,
    utc,
)
from bridge.migrate import upgrade


def create_schema(engine: Engine) -> None:
    """Brings the journal's schema to the current revision (bridge/migrations); any start does this."""
    upgrade(engine)


def _instant(value: dt.datetime, whole_seconds: bool) -> dt.datetime:
    """An instant as stored (SQLite and MariaDB give back the UTC wall time, naive; MariaDB's DATETIME
    keeps whole seconds) or as made, at the stored precision."""
    value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else utc(value)
    return value.replace(microsecond=0) if whole_seconds else value


def _insert_ignoring_duplicates(dialect: str) -> sa.Insert:
    stmt = requests.insert()
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        return pg_insert(requests).on_conflict_do_nothing(index_elements=["kind", "serial"])
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        return sqlite_insert(requests).on_conflict_do_nothing(index_elements=["kind", "serial"])
    # MariaDB/MySQL: values were validated against the column sizes, so IGNORE can only skip the duplicate.
    return stmt.prefix_with("IGNORE")


def _readers() -> dict[str, Any]:
    """The journal's statements that find rows by state or by original serial, built once. Each is
    served by an index on every back end (on PostgreSQL a partial one: the states and the kind are
    literals, see schema.in_states; tests/bridge/test_journal_indexes.py checks their generic plans)."""
    c = requests.c
    now = sa.bindparam("now_ms", type_=sa.BigInteger)
    lim = sa.bindparam("lim", type_=sa.Integer)
    day = sa.bindparam("day", type_=sa.Date)
    return {
        "pending": sa.select(c.kind, c.serial, c.bank_id, c.amount_fen).where(in_states(PENDING)),
        "due_reversals": sa.select(c.kind, c.serial).where(
            sa.or_(sa.and_(in_states(REVERSING), c.kind == PAY), sa.and_(in_states(SUSPECT), c.kind == CANCEL)),
            c.next_attempt_ms <= now).order_by(c.next_attempt_ms).limit(lim),
        "due_probes": sa.select(c.kind, c.serial).where(
            in_states(SUSPECT, RETRYABLE), c.kind == PAY, c.next_attempt_ms <= now
        ).order_by(c.next_attempt_ms).limit(lim),
        "in_doubt_count": sa.select(sa.func.count()).select_from(requests).where(
            c.business_date == day,
            sa.or_(in_states(*sorted(IN_DOUBT_STATES)), sa.and_(in_states(RETRYABLE), c.kind == PAY))),
        "expedite_retryable": requests.update().where(
            c.business_date == day, in_states(RETRYABLE), c.kind == PAY, c.next_attempt_ms > 0
        ).values(next_attempt_ms=0),
        "cancels_of": sa.select(requests).where(kind_is(CANCEL), c.original_serial == sa.bindparam("o")),
    }


READERS = _readers()


class Journal:
    """Repository over the journal tables, statements built once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # rowcount tells a new serial from a journaled one (SQLAlchemy keeps it for INSERT only on request).
        self._insert = _insert_ignoring_duplicates(engine.dialect.name).execution_options(preserve_rowcount=True)
        self._insert_plain = requests.insert()
        self._existing = sa.select(requests.c.serial).where(
            requests.c.kind == sa.bindparam("k"), requests.c.serial.in_(sa.bindparam("s", expanding=True)))
        self._select = sa.select(requests).where(requests.c.kind == sa.bindparam("k"),
                                                 requests.c.serial == sa.bindparam("s"))
        self._update = requests.update().where(
            requests.c.kind == sa.bindparam("b_kind"), requests.c.serial == sa.bindparam("b_serial")
        ).values(state=sa.bindparam("state"), status_code=sa.bindparam("status_code"), body=sa.bindparam("body"),
                 message=sa.bindparam("message"), reversal_serial=sa.bindparam("reversal_serial"),
                 attempts=sa.bindparam("attempts"), next_attempt_ms=sa.bindparam("next_attempt_ms"),
                 updated_at=sa.bindparam("updated_at"))
        self._audit = audit.insert()
        self._pg = PgBatch() if engine.dialect.name == "postgresql" else None
        self._cancels_of = READERS["cancels_of"]

    def open_writer_connection(self) -> sa.Connection:
        """The journal writer's own connection, kept across its batches (on PostgreSQL with the
        batch statement's keyed plan, PgBatch.WRITER_SESSION)."""
        conn = self.engine.connect()
        if self._pg is not None:
            try:
                for sql in PgBatch.WRITER_SESSION:
                    conn.exec_driver_sql(sql)
                conn.commit()
            except sa.exc.SQLAlchemyError:
                conn.invalidate()
                conn.close()
                raise
        return conn

    def close_writer_connection(self, conn: sa.Connection) -> None:
        """Back to the pool as any other connection."""
        if self._pg is not None:
            for sql in PgBatch.WRITER_SESSION_RESET:
                conn.exec_driver_sql(sql)
            conn.commit()
        conn.close()

    def insert_new(self, entry: Entry) -> bool:
        """Journals a new request durably; False when the serial is already journaled."""
        with self.engine.begin() as conn:
            return conn.execute(self._insert, entry.row()).rowcount == 1

    def get(self, kind: str, serial: str) -> Entry | None:
        with self.engine.connect() as conn:
            row = conn.execute(self._select, {"k": kind, "s": serial}).mappings().first()
        return Entry(**row) if row is not None else None

    def write(self, entries: Sequence[Entry], outcomes: Sequence[Outcome],
              conn: sa.Connection | None = None) -> set[tuple[str, str]]:
        """One transaction (on `conn` if given): new rows (keys distinct; serials
        already journaled are left alone) and outcomes with their audit lines.
        Returns the keys inserted. Only the journal writer thread inserts, so
        nothing can slip in between the lookup and the insert."""
        if conn is None:
            with self.engine.connect() as own:
                return self.write(entries, outcomes, own)
        inserted: set[tuple[str, str]] = set()
        if self._pg is not None and self._pg.fits(entries, outcomes) and not conn.in_transaction():
            return self._pg.write(conn, entries, outcomes)  # one statement: its own transaction
        with conn.begin():
            if entries:
                existing: set[tuple[str, str]] = set()
                for kind in {e.kind for e in entries}:
                    serials = [e.serial for e in entries if e.kind == kind]
                    existing.update((kind, r[0]) for r in conn.execute(self._existing, {"k": kind, "s": serials}))
                new = [e for e in entries if e.key not in existing]
                if new:
                    conn.execute(self._insert_plain, [e.row() for e in new])
                inserted = {e.key for e in new}
            if outcomes:
                self._record_in(conn, outcomes)
        return inserted

    def landed(self, entries: Sequence[Entry], outcomes: Sequence[Outcome],
               conn: sa.Connection) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """After a write whose answer was lost (its connection broke once the write was sent, so it
        may have committed): the keys of `entries` whose rows that write inserted, and of `outcomes`
        it applied. A row is that write's own when it is still PENDING with the same request and the
        same `created_at` (the instant this process journaled it: a row of another process or an
        earlier life has its own); an outcome is applied when its row has the outcome's state and
        `updated_at`. One read, in a transaction of its own on `conn`."""
        keys = [e.key for e in entries] + [o.key for o in outcomes]
        if not keys:
            return set(), set()
        c = requests.c
        with conn.begin():
            found = {(r.kind, r.serial): r for r in conn.execute(
                sa.select(requests).where(sa.tuple_(c.kind, c.serial).in_(keys))).mappings()}
        secs = self.engine.dialect.name == "mysql"
        mine = {e.key for e in entries if (r := found.get(e.key)) is not None and r["state"] == PENDING
                and Entry(**r).same_request(e) and _instant(r["created_at"], secs) == _instant(e.created_at, secs)}
        applied = {o.key for o in outcomes if (r := found.get(o.key)) is not None
                   and r["state"] == o.state and _instant(r["updated_at"], secs) == _instant(o.at, secs)}
        return mine, applied

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """One transaction: every row's new state plus its audit line."""
        if not outcomes:
            return
        with self.engine.begin() as conn:
            self._record_in(conn, outcomes)

    def _record_in(self, conn: sa.Connection, outcomes: Sequence[Outcome]) -> None:
        updates = [{"b_kind": o.kind, "b_serial": o.serial, "state": o.state, "status_code": o.status_code,
                    "body": o.body, "message": o.message, "reversal_serial": o.reversal_serial,
                    "attempts": o.attempts, "next_attempt_ms": o.next_attempt_ms, "updated_at": utc(o.at)}
                   for o in outcomes]
        lines = [{"at": utc(o.at), "kind": o.kind, "serial": o.serial, "bank_id": o.bank_id,
                  "amount_fen": o.amount_fen, "state": o.state, "status_code": o.status_code,
                  "detail": o.message} for o in outcomes]
        conn.execute(self._update, updates)
        conn.execute(self._audit, lines)

    def cancels_of(self, original_serial: str) -> list[Entry]:
        """The journaled Cancels of a pay (a replayed pay that was reversed is refused)."""
        with self.engine.connect() as conn:
            rows = conn.execute(self._cancels_of, {"o": original_serial}).mappings().all()
        return [Entry(**r) for r in rows]

    def recover_orphans(self, at: dt.datetime) -> int:
        """At start-up no request is in flight: every PENDING row lost its answer
        in a crash and becomes SUSPECT, due at once. Returns how many."""
        at = utc(at)
        with self.engine.begin() as conn:
            rows = conn.execute(READERS["pending"]).all()
            if not rows:
                return 0
            conn.execute(requests.update().where(in_states(PENDING))
                         .values(state=SUSPECT, next_attempt_ms=0, updated_at=at))
            conn.execute(self._audit, [{"at": at, "kind": r.kind, "serial": r.serial, "bank_id": r.bank_id,
                                        "amount_fen": r.amount_fen, "state": SUSPECT, "status_code": None,
                                        "detail": "pending at start-up: answer lost"} for r in rows])
        return len(rows)

    def due(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        """Keys of in-doubt rows due for another attempt: reversals first
        (REVERSING pays, SUSPECT cancels), then status probes of SUSPECT pays
        and of RETRYABLE pays the bank core left alone past their probe time."""
        with self.engine.connect() as conn:
            keys = [(r.kind, r.serial) for r in conn.execute(READERS["due_reversals"],
                                                             {"now_ms": now_ms, "lim": limit})]
            if len(keys) < limit:
                keys += [(r.kind, r.serial) for r in conn.execute(READERS["due_probes"],
                                                                  {"now_ms": now_ms, "lim": limit - len(keys)})]
        return keys

    def in_doubt_count(self, business_date: dt.date) -> int:
        """Rows of the day whose outcome at the utility is not known for sure: the in-doubt
        states, and RETRYABLE pays (refused "for now": their refusal could have followed a
        commit whose answer was lost, so they are probed before the day is reconciled)."""
        with self.engine.connect() as conn:
            return int(conn.execute(READERS["in_doubt_count"], {"day": business_date}).scalar_one())

    def expedite_retryable(self, business_date: dt.date) -> int:
        """Makes the day's RETRYABLE pays due for a probe now (the bank core is reconciling:
        it will not retry them any more). Returns how many."""
        with self.engine.begin() as conn:
            return int(conn.execute(READERS["expedite_retryable"], {"day": business_date}).rowcount)

    def counts_by_state(self) -> dict[str, int]:
        stmt = sa.select(requests.c.state, sa.func.count()).group_by(requests.c.state)
        with self.engine.connect() as conn:
            return {r[0]: int(r[1]) for r in conn.execute(stmt)}

    def audit_lines(self, kind: str, serial: str) -> list[dict[str, Any]]:
        """A serial's audit lines in order. A scan of the audit: nothing in the product reads it by serial,
        so it keeps no index for that (revision 0008_journalpg_audit_lean)."""
        stmt = (sa.select(audit).where(audit.c.kind == kind, audit.c.serial == serial)
                .order_by(audit.c.audit_id))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]
