"""A tamper-evident hash chain over an append-only journal table (the MIS's
`journal`, the bridge's `bridge_audit`), kept in a companion seals table.

A sealer (a background thread of the server, or `audit seal`) takes the
journal rows not yet sealed, in id order, and appends one seal per row:
gapless `seal_no`, the row's id, the columns it hashed, the previous seal's
hash and its own: SHA-256 over the previous hash and the row's canonical
form (column = value, sorted). Sealing is off the money path: a pay never
waits for the chain. `verify` walks the seals in order and names every
entry that was edited (hash differs), deleted (sealed id gone), reordered
(ids swapped: both hashes differ) or whose seal was removed (a gap in
seal_no or a broken link).

What it cannot see: a row written behind the system's back before the
sealer ran is sealed like any other, and the newest rows with their seals
cut off together look like a shorter chain (publish the head hash to an
outside party to close that). Append-only is enforced by triggers where
the database can (PostgreSQL, MariaDB, SQLite): `append_only_ddl`."""
from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

GENESIS = "0" * 64
SEAL_BATCH_MAX = 1_000            # rows sealed per transaction
# A background pass looks for unsealed rows only this many ids below the head's entry (a row that
# committed after rows with higher ids: a longer transaction), and over the whole table every
# FULL_PASS_EVERY passes and at stop; the whole-table anti-join costs O(journal) (56 ms at 16,500
# rows on PostgreSQL), which every 2 s would grow without bound with the journal.
SEAL_LOOKBACK_IDS = 1_000
FULL_PASS_EVERY = 150
VERIFY_FETCH_ROWS = 5_000
PROBLEMS_KEPT_MAX = 100


def seals_table(metadata: sa.MetaData, name: str) -> sa.Table:
    return sa.Table(
        name, metadata,
        sa.Column("seal_no", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("entry_id", sa.BigInteger, nullable=False, unique=True),
        sa.Column("columns", sa.String(512), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.Column("sealed_at", sa.DateTime(timezone=True), nullable=False),
    )


def _canonical(value: Any) -> str:
    kind = type(value)
    if kind is str:  # the common cases first (bool is not int here: type(), not isinstance)
        return value  # type: ignore[no-any-return]
    if kind is int:
        return str(value)
    if value is None:
        return "\x00null"
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def chain_hashes(prev_hash: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The chained hashes of `rows` (each a tuple of the values of `columns`, in that order) after
    `prev_hash`: for each row SHA-256 over the previous hash and `\x1f<column>=<canonical value>` per
    column. The text is one %-format built once per call; str and int values go in as they are
    (`%s` of an int is its str(), as `_canonical` does); everything else through `_canonical`. The
    same bytes as formatting each value separately (tests/mis_adapter/test_audit_chain_hash.py
    compares it with the per-column form it replaced, over random rows of every value type)."""
    fmt = "".join("\x1f" + c.replace("%", "%%") + "=%s" for c in columns)
    canonical, sha256, out, prev = _canonical, hashlib.sha256, [], prev_hash
    for row in rows:
        text = fmt % tuple([v if (k := type(v)) is str or k is int else canonical(v) for v in row])
        prev = sha256((prev + text).encode("utf-8")).hexdigest()
        out.append(prev)
    return out


def entry_hash(prev_hash: str, columns: Sequence[str], row: Any) -> str:
    """The hash of one row given as a mapping (column name -> value)."""
    return chain_hashes(prev_hash, columns, [tuple([row[c] for c in columns])])[0]


@dataclass(frozen=True)
class Chain:
    """One journal table and its seals table."""
    entries: sa.Table
    id_column: str
    seals: sa.Table

    @property
    def columns(self) -> list[str]:
        return sorted(c.name for c in self.entries.columns)

    @cached_property
    def _statements(self) -> dict[str, Any]:
        """The sealer's statements, built once per chain (a pass every 2 s otherwise rebuilt and re-keyed
        them for SQLAlchemy's compiled cache, the larger part of a pass's CPU at a few hundred rows)."""
        s, e = self.seals.c, self.entries.c
        ident, columns = e[self.id_column], self.columns
        floor, n = sa.bindparam("floor", type_=sa.BigInteger), sa.bindparam("batch_max", type_=sa.Integer)

        def pending(join_on: sa.ColumnElement[bool], where: sa.ColumnElement[bool]) -> sa.Select[Any]:
            # Plain tuples in the hashed column order: no mapping per row, no lookup per value.
            return (sa.select(*[e[c] for c in columns]).select_from(self.entries.outerjoin(self.seals, join_on))
                    .where(where).order_by(ident).limit(n))

        return {
            "head": sa.select(s.seal_no, s.entry_hash, s.entry_id).order_by(s.seal_no.desc()).limit(1)
            .with_for_update(),
            "all": pending(s.entry_id == ident, s.seal_no.is_(None)),
            # Bounded on both sides so that each is an index range scan, not the whole table.
            "window": pending(sa.and_(s.entry_id == ident, s.entry_id > floor), sa.and_(s.seal_no.is_(None),
                                                                                   ident > floor)),
            "insert": self.seals.insert(),
            "columns": columns,
            "joined_columns": ",".join(columns),
            "id_at": columns.index(self.id_column),
        }

    def seal_pending(self, engine: Engine, now: dt.datetime, batch_max: int = SEAL_BATCH_MAX,
                     lookback_ids: int | None = None) -> int:
        """Seals up to batch_max unsealed rows; returns how many. Concurrent sealers: one wins, the other retries.
        `lookback_ids`: look only at rows above the head's entry id minus this (None: the whole table)."""
        st = self._statements
        try:
            with engine.begin() as conn:
                head = conn.execute(st["head"]).first()
                seal_no, prev = (int(head.seal_no), str(head.entry_hash)) if head else (0, GENESIS)
                if head is not None and lookback_ids is not None:
                    rows = conn.execute(st["window"], {"floor": int(head.entry_id) - lookback_ids,
                                                       "batch_max": batch_max}).all()
                else:
                    rows = conn.execute(st["all"], {"batch_max": batch_max}).all()
                if not rows:
                    return 0
                at = st["id_at"]
                ids = [row[at] for row in rows]
                hashes = chain_hashes(prev, st["columns"], rows)
                self._insert_seals(conn, seal_no + 1, ids, [prev, *hashes[:-1]], hashes, st["joined_columns"], now)
                return len(rows)
        except IntegrityError:
            return 0  # another sealer took these seal numbers first; the next pass continues from its head

    def _insert_seals(self, conn: Connection, first_no: int, ids: list[Any], prevs: list[str], hashes: list[str],
                      columns: str, now: dt.datetime) -> None:
        """The batch's seals, numbered from first_no. On PostgreSQL as ONE statement whose per-seal
        values are three comma-joined texts (ids, previous hashes, hashes: digits and hex only) split
        by the server (a pass seals up to ~1,000 rows: an executemany costs a bound, dumped and executed
        statement per row, a JSON document a dict and an encoded object per row); elsewhere as an
        executemany."""
        if conn.dialect.name != "postgresql":
            conn.execute(self._statements["insert"], [
                {"seal_no": first_no + i, "entry_id": ident, "columns": columns, "prev_hash": p, "entry_hash": h,
                 "sealed_at": now} for i, (ident, p, h) in enumerate(zip(ids, prevs, hashes, strict=True))])
            return
        conn.exec_driver_sql(
            f"INSERT INTO {self.seals.name} (seal_no, entry_id, columns, prev_hash, entry_hash, sealed_at) "
            "SELECT %(first)s::bigint + u.n - 1, u.id::bigint, %(columns)s, u.prev, u.h, %(at)s "
            "FROM unnest(string_to_array(%(ids)s, ','), string_to_array(%(prevs)s, ','), "
            "string_to_array(%(hashes)s, ',')) WITH ORDINALITY AS u(id, prev, h, n)",
            {"first": first_no, "columns": columns, "at": now, "ids": ",".join(map(str, ids)),
             "prevs": ",".join(prevs), "hashes": ",".join(hashes)})

    def verify(self, conn: Connection) -> tuple[int, list[str], int]:
        """(seals checked, problems naming the entries, rows not yet sealed). Seals are read a page at a
        time and each page's entries in one query by id (one round trip per VERIFY_FETCH_ROWS seals, not
        one per seal: 20,000 rows took over 10 s of round trips that way)."""
        s, e = self.seals.c, self.entries.c
        ident = e[self.id_column]
        problems: list[str] = []
        expected_no, prev, checked = 1, GENESIS, 0
        for page in self._seal_pages(conn):
            ids = [seal["entry_id"] for seal in page]
            rows = {row[self.id_column]: row
                    for row in conn.execute(sa.select(self.entries).where(ident.in_(ids))).mappings()}
            for seal in page:
                checked += 1
                self._check_seal(seal, expected_no, prev, rows.get(seal["entry_id"]), problems)
                prev, expected_no = seal["entry_hash"], seal["seal_no"] + 1
                if len(problems) >= PROBLEMS_KEPT_MAX:
                    break
            if len(problems) >= PROBLEMS_KEPT_MAX:
                break
        unsealed = conn.execute(sa.select(sa.func.count()).select_from(
            self.entries.outerjoin(self.seals, s.entry_id == ident)).where(s.seal_no.is_(None))).scalar_one()
        return checked, problems, int(unsealed)

    @staticmethod
    def _check_seal(seal: Any, expected_no: int, prev: str, row: Any, problems: list[str]) -> None:
        """Append to problems what is wrong with one seal and the entry it names (None: the entry is gone)."""
        if seal["seal_no"] != expected_no:
            problems.append(f"seals {expected_no}..{seal['seal_no'] - 1} missing (removed from the chain)")
        if seal["prev_hash"] != prev:
            problems.append(f"seal {seal['seal_no']} (entry {seal['entry_id']}): link broken, previous hash "
                            "differs (a seal was removed or edited)")
        if row is None:
            problems.append(f"entry {seal['entry_id']} deleted (seal {seal['seal_no']})")
            return
        cols = seal["columns"].split(",")
        missing = [c for c in cols if c not in row]
        if missing or entry_hash(seal["prev_hash"], cols, row) != seal["entry_hash"]:
            problems.append(f"entry {seal['entry_id']} edited or reordered (seal {seal['seal_no']})")

    def _seal_pages(self, conn: Connection) -> Iterator[Sequence[Any]]:
        """Every seal in order, a page of VERIFY_FETCH_ROWS at a time (keyset: no open cursor while the
        entries are read)."""
        s, after = self.seals.c, 0
        while True:
            page = conn.execute(sa.select(self.seals).where(s.seal_no > after).order_by(s.seal_no)
                                .limit(VERIFY_FETCH_ROWS)).mappings().all()
            if not page:
                return
            yield page
            after = page[-1]["seal_no"]


def append_only_ddl(dialect: str, table: str) -> list[str]:
    """Statements making `table` refuse UPDATE and DELETE (INSERT only)."""
    if dialect == "postgresql":
        return [
            "CREATE OR REPLACE FUNCTION yd_append_only() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'table % is append-only', TG_TABLE_NAME; END $$ LANGUAGE plpgsql",
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION yd_append_only()",
        ]
    if dialect in ("mysql", "mariadb"):
        return [f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} FOR EACH ROW "
                f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{table} is append-only'" for op in ("UPDATE", "DELETE")]
    if dialect == "sqlite":
        return [f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END" for op in ("UPDATE", "DELETE")]
    return []


def drop_append_only_ddl(dialect: str, table: str) -> list[str]:
    if dialect == "postgresql":
        return [f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}"]
    return [f"DROP TRIGGER IF EXISTS {table}_no_{op.lower()}" for op in ("update", "delete")]


class Sealer:
    """The server's background sealer: seals new journal rows every interval_s
    (a database error is logged and retried at the next pass)."""

    def __init__(self, jobs: list[tuple[Chain, Engine]], interval_s: float, now: Any) -> None:
        import threading
        self._jobs, self._interval_s, self._now = jobs, interval_s, now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-sealer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._interval_s + 5)
        self.seal_once()  # what the drain's last calls journaled

    def seal_once(self, lookback_ids: int | None = None) -> int:
        """One pass over every chain (lookback_ids: see Chain.seal_pending; None: whole tables)."""
        total = 0
        for chain, engine in self._jobs:
            while n := chain.seal_pending(engine, self._now(), lookback_ids=lookback_ids):
                total += n
        return total

    def _run(self) -> None:
        import logging
        log = logging.getLogger("yindian.audit")
        passes = 0
        while not self._stop.wait(self._interval_s):
            passes += 1
            try:
                self.seal_once(None if passes % FULL_PASS_EVERY == 0 else SEAL_LOOKBACK_IDS)
            except sa.exc.SQLAlchemyError as exc:
                log.warning("event=audit_seal_failed error=%s", type(exc).__name__)
