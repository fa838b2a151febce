"""A tamper-evident hash chain over an append-only journal table (the MIS's
`journal`, the bridge's `bridge_audit`).

A sealer (a background thread of the server, or `audit seal`) takes the
journal rows not yet sealed, in id order, up to SEAL_BATCH_MAX of them, and
appends ONE seal for them to the seals table: a gapless `seal_no`, the
rows' ids (8 bytes each, ascending) and the SHA-256 digest of each row's
canonical form (column = value, sorted; 32 bytes each), the columns hashed,
the previous seal's hash and its own: SHA-256 over the previous hash, the
columns, the ids and the digests. Sealing is off the money path: a pay never
waits for the chain. `verify` walks the seals in order and names every
entry that was edited (its digest differs), deleted (sealed id gone),
reordered (two rows' contents swapped: both digests differ), every seal
removed (a gap in seal_no or a broken link) and every seal edited (its hash
differs from its contents).

Chains begun before batch seals keep their seals: one per row, in the
per-row table (`seals_table`, hash = SHA-256 over the previous hash and the
row's canonical form, see `chain_hashes`), no longer appended to. The batch
seals continue that chain: the first one's seal_no follows the last per-row
seal's and its previous hash is that seal's hash; verify walks both.

What it cannot see: a row written behind the system's back before the
sealer ran is sealed like any other, and the newest rows with their seals
cut off together look like a shorter chain (publish the head hash to an
outside party to close that). Append-only is enforced by triggers where
the database can (PostgreSQL, MariaDB, SQLite): `append_only_ddl`."""
from __future__ import annotations

import datetime as dt
import hashlib
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

GENESIS = "0" * 64
SEAL_BATCH_MAX = 1_000            # entries per seal (and per sealing transaction)
DIGEST_BYTES = 32                 # SHA-256, one per entry in a seal's `digests`
ID_BYTES = 8                      # one signed big-endian id per entry in a seal's `entry_ids`
# A seal's blobs are MEDIUMBLOB on MariaDB (BLOB holds only 64 KiB): room for 500,000 entries.
SEAL_BLOB_BYTES_MAX = 16 * 2**20 - 1
SealBlob = sa.LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql", "mariadb")
# A background pass looks for unsealed rows only this many ids below the highest sealed id (a row that
# committed after rows with higher ids: a longer transaction), and over the whole table every
# FULL_PASS_EVERY passes and at stop (a count of the entries at or below the highest sealed id against
# the seals' entry counts: an index range count, and a walk of every seal's ids only when they differ).
SEAL_LOOKBACK_IDS = 1_000
FULL_PASS_EVERY = 150
VERIFY_FETCH_ROWS = 5_000         # entries read per round trip by verify
PROBLEMS_KEPT_MAX = 100

assert SEAL_BATCH_MAX * DIGEST_BYTES <= SEAL_BLOB_BYTES_MAX


def seals_table(metadata: sa.MetaData, name: str) -> sa.Table:
    """The per-row seals of chains begun before batch seals (read by verify, no longer appended to)."""
    return sa.Table(
        name, metadata,
        sa.Column("seal_no", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("entry_id", sa.BigInteger, nullable=False, unique=True),
        sa.Column("columns", sa.String(512), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.Column("sealed_at", sa.DateTime(timezone=True), nullable=False),
    )


def batch_seals_table(metadata: sa.MetaData, name: str) -> sa.Table:
    """One seal per batch of entries (see the module docstring). `last_entry_id` is the batch's
    highest id (its ids are ascending): the sealer finds the seals of its look-back window by it;
    `entry_count` and `id_sum` (the sum of its ids) let a full pass check that every entry up to the
    highest sealed id is sealed with one count and one sum. Neither is hashed: verify reads the ids."""
    return sa.Table(
        name, metadata,
        sa.Column("seal_no", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("last_entry_id", sa.BigInteger, nullable=False, unique=True),
        sa.Column("entry_count", sa.Integer, nullable=False),
        sa.Column("id_sum", sa.BigInteger, nullable=False),
        sa.Column("entry_ids", SealBlob, nullable=False),
        sa.Column("digests", SealBlob, nullable=False),
        sa.Column("columns", sa.String(512), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("seal_hash", sa.String(64), nullable=False),
        sa.Column("sealed_at", sa.DateTime(timezone=True), nullable=False),
    )


def _canonical(value: Any) -> str:
    kind = type(value)
    if kind is str:  # the common cases first (bool is not int here: type(), not isinstance)
        return value  # type: ignore[no-any-return]
    if kind is int:
        return str(value)
    if kind is dt.datetime and value.tzinfo is not None:
        # Every instant a driver hands back, in UTC: its isoformat less the "+00:00" the conversion
        # below would strip (1 us against 3; a non-zero offset never ends so).
        text = value.isoformat()
        if text.endswith("+00:00"):
            return text[:-6]
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


def _row_format(columns: Sequence[str]) -> str:
    return "".join("\x1f" + c.replace("%", "%%") + "=%s" for c in columns)


def _texts(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Iterator[str]:
    """Each row's canonical form: `\x1f<column>=<canonical value>` per column. One %-format per row;
    str and int values go in as they are (`%s` of an int is its str(), as `_canonical` does),
    everything else through `_canonical` (tests/common/test_audit_chain_hash.py holds it equal to the
    per-column form over random rows of every value type)."""
    fmt, canonical = _row_format(columns), _canonical
    for row in rows:
        yield fmt % tuple([v if (k := type(v)) is str or k is int else canonical(v) for v in row])


def chain_hashes(prev_hash: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The per-row seals' chained hashes of `rows` (each a tuple of the values of `columns`, in that
    order) after `prev_hash`: for each row SHA-256 over the previous hash and the row's canonical form."""
    sha256, out, prev = hashlib.sha256, [], prev_hash
    for text in _texts(columns, rows):
        prev = sha256((prev + text).encode("utf-8")).hexdigest()
        out.append(prev)
    return out


def entry_hash(prev_hash: str, columns: Sequence[str], row: Any) -> str:
    """The per-row hash of one row given as a mapping (column name -> value)."""
    return chain_hashes(prev_hash, columns, [tuple([row[c] for c in columns])])[0]


def entry_digests(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    """The batch seal's digests: SHA-256 of each row's canonical form, concatenated (32 bytes each)."""
    sha256 = hashlib.sha256
    return b"".join([sha256(text.encode("utf-8")).digest() for text in _texts(columns, rows)])


def pack_ids(ids: Sequence[int]) -> bytes:
    return struct.pack(f">{len(ids)}q", *ids)


def unpack_ids(blob: bytes) -> tuple[int, ...]:
    return struct.unpack(f">{len(blob) // ID_BYTES}q", blob)


def seal_hash(prev_hash: str, columns: str, ids_blob: bytes, digests: bytes) -> str:
    """A batch seal's hash: SHA-256 over the previous seal's hash, the columns and the two blobs
    (hex, a separator, text, a separator, then fixed-width fields: no two seals share a preimage)."""
    h = hashlib.sha256(prev_hash.encode("ascii") + b"\x1e" + columns.encode("utf-8") + b"\x1e")
    h.update(ids_blob)
    h.update(digests)
    return h.hexdigest()


class _Head(NamedTuple):
    seal_no: int            # the last seal's number (0: none)
    hash: str               # its hash (GENESIS: none)
    max_sealed: int | None  # the highest entry id sealed (None: none)
    row_seals: int          # the per-row seals' highest number (0: none; they are numbered from 1, gapless)


@dataclass(frozen=True)
class Chain:
    """One journal table, its per-row seals (chains begun before batch seals) and its batch seals."""
    entries: sa.Table
    id_column: str
    seals: sa.Table
    batches: sa.Table

    @property
    def columns(self) -> list[str]:
        return sorted(c.name for c in self.entries.columns)

    @cached_property
    def _statements(self) -> dict[str, Any]:
        """The sealer's statements, built once per chain (a pass every 2 s otherwise rebuilt and re-keyed
        them for SQLAlchemy's compiled cache)."""
        s, b, e = self.seals.c, self.batches.c, self.entries.c
        ident, columns = e[self.id_column], self.columns
        n = sa.bindparam("batch_max", type_=sa.Integer)
        after = sa.bindparam("after", type_=sa.BigInteger)
        floor = sa.bindparam("floor", type_=sa.BigInteger)
        rows = sa.select(*[e[c] for c in columns])  # plain tuples in the hashed column order
        last_batch = sa.select(b.seal_no, b.seal_hash).order_by(b.seal_no.desc()).limit(1)
        last_row_seal = sa.select(s.seal_no, s.entry_hash).order_by(s.seal_no.desc()).limit(1)
        return {
            # One round trip: both heads and the highest sealed id (each an index probe).
            "head": sa.select(
                last_batch.with_only_columns(b.seal_no).scalar_subquery(),
                last_batch.with_only_columns(b.seal_hash).scalar_subquery(),
                last_row_seal.with_only_columns(s.seal_no).scalar_subquery(),
                last_row_seal.with_only_columns(s.entry_hash).scalar_subquery(),
                sa.select(sa.func.max(b.last_entry_id)).scalar_subquery(),
                sa.select(sa.func.max(s.entry_id)).scalar_subquery()),
            "batch_entries": sa.select(sa.func.coalesce(sa.func.sum(b.entry_count), 0),
                                       sa.func.coalesce(sa.func.sum(b.id_sum), 0)),
            "row_seal_ids": sa.select(sa.func.coalesce(sa.func.sum(s.entry_id), 0)),
            "new": rows.where(ident > after).order_by(ident).limit(n),
            "new_or_holes": rows.where(sa.or_(ident > after, ident.in_(sa.bindparam("holes", expanding=True))))
            .order_by(ident).limit(n),
            "window_batches": sa.select(b.entry_ids).where(b.last_entry_id > floor),
            "window_row_seals": sa.select(s.entry_id).where(s.entry_id > floor),
            "count_upto": sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(ident), 0))
            .select_from(self.entries).where(ident <= after),
            "all_batch_ids": sa.select(b.entry_ids),
            "all_row_seal_ids": sa.select(s.entry_id),
            "ids_upto": sa.select(ident).where(ident <= after).order_by(ident),
            "insert": self.batches.insert(),
            "columns": columns,
            "joined_columns": ",".join(columns),
            "id_at": columns.index(self.id_column),
        }

    def _head(self, conn: Connection) -> _Head:
        b_no, b_hash, r_no, r_hash, b_max, r_max = conn.execute(self._statements["head"]).one()
        if b_no is not None:
            seal_no, prev = int(b_no), str(b_hash)
        elif r_no is not None:
            seal_no, prev = int(r_no), str(r_hash)
        else:
            seal_no, prev = 0, GENESIS
        highs = [int(x) for x in (b_max, r_max) if x is not None]
        return _Head(seal_no, prev, max(highs) if highs else None, int(r_no or 0))

    def _holes(self, conn: Connection, head: _Head, lookback_ids: int | None) -> list[int]:
        """Ids at or below the highest sealed one that no seal names (None lookback: the whole table;
        else those above the highest sealed id minus lookback_ids). Mostly ids never used (a rolled
        back insert), some a row that committed after a higher one was sealed."""
        st, top = self._statements, head.max_sealed
        assert top is not None
        if lookback_ids is None:
            # Entries up to the highest sealed id, counted and summed, against what the seals name:
            # equal, every one is sealed (the common case). A sealed entry deleted (tampering) and a
            # late one unsealed would leave the count equal, not the sum.
            count, total = conn.execute(st["batch_entries"]).one()
            sealed_sum = int(total) + int(conn.execute(st["row_seal_ids"]).scalar_one())
            upto_count, upto_sum = conn.execute(st["count_upto"], {"after": top}).one()
            if (int(upto_count), int(upto_sum)) == (head.row_seals + int(count), sealed_sum):
                return []
            sealed = {i for (blob,) in conn.execute(st["all_batch_ids"]) for i in unpack_ids(blob)}
            sealed.update(i for (i,) in conn.execute(st["all_row_seal_ids"]))
            return [i for (i,) in conn.execute(st["ids_upto"], {"after": top}) if i not in sealed]
        floor = top - lookback_ids
        sealed = {i for (blob,) in conn.execute(st["window_batches"], {"floor": floor}) for i in unpack_ids(blob)}
        sealed.update(i for (i,) in conn.execute(st["window_row_seals"], {"floor": floor}))
        return [i for i in range(max(floor + 1, 0), top) if i not in sealed]

    def seal_pending(self, engine: Engine, now: dt.datetime, batch_max: int = SEAL_BATCH_MAX,
                     lookback_ids: int | None = None) -> int:
        """Seals up to batch_max unsealed rows under one seal; returns how many. Concurrent sealers: one
        wins (the seal number and the highest id are unique), the other's pass seals nothing.
        `lookback_ids`: look for late rows only above the highest sealed id minus this (None: the
        whole table)."""
        st = self._statements
        batch_max = max(1, min(batch_max, SEAL_BLOB_BYTES_MAX // DIGEST_BYTES))
        try:
            with engine.begin() as conn:
                head = self._head(conn)
                if head.max_sealed is None:
                    rows = conn.execute(st["new"], {"after": -2**63, "batch_max": batch_max}).all()
                else:
                    holes = self._holes(conn, head, lookback_ids)
                    params = {"after": head.max_sealed, "batch_max": batch_max}
                    rows = (conn.execute(st["new_or_holes"], {**params, "holes": holes}) if holes
                            else conn.execute(st["new"], params)).all()
                if not rows:
                    return 0
                at, columns = st["id_at"], st["joined_columns"]
                ids = [row[at] for row in rows]
                ids_blob, digests = pack_ids(ids), entry_digests(st["columns"], rows)
                conn.execute(st["insert"], {
                    "seal_no": head.seal_no + 1, "last_entry_id": ids[-1], "entry_count": len(ids), "id_sum": sum(ids),
                    "entry_ids": ids_blob, "digests": digests, "columns": columns, "prev_hash": head.hash,
                    "seal_hash": seal_hash(head.hash, columns, ids_blob, digests), "sealed_at": now})
                return len(rows)
        except IntegrityError:
            return 0  # another sealer took this seal number first; the next pass continues from its head

    def verify(self, conn: Connection) -> tuple[int, list[str], int]:
        """(entries checked, problems naming the entries and seals, rows not yet sealed). The per-row
        seals first, then the batch seals, in seal_no order; entries are read VERIFY_FETCH_ROWS at a
        time by id (one round trip per page, not one per entry)."""
        problems: list[str] = []
        state = _VerifyState()
        for page in self._row_seal_pages(conn):
            rows = self._rows_by_id(conn, [seal["entry_id"] for seal in page])
            for seal in page:
                state.checked += 1
                self._check_row_seal(seal, state, rows.get(seal["entry_id"]), problems)
                if len(problems) >= PROBLEMS_KEPT_MAX:
                    return state.checked, problems[:PROBLEMS_KEPT_MAX], self._unsealed(conn, state)
        for seal in self._batch_seals(conn):
            self._check_batch_seal(conn, seal, state, problems)
            if len(problems) >= PROBLEMS_KEPT_MAX:
                break
        return state.checked, problems[:PROBLEMS_KEPT_MAX], self._unsealed(conn, state)

    def _unsealed(self, conn: Connection, state: _VerifyState) -> int:
        total = int(conn.execute(sa.select(sa.func.count()).select_from(self.entries)).scalar_one())
        return total - state.present

    def _rows_by_id(self, conn: Connection, ids: Sequence[int]) -> dict[int, Any]:
        ident = self.entries.c[self.id_column]
        out: dict[int, Any] = {}
        for i in range(0, len(ids), VERIFY_FETCH_ROWS):
            out.update((row[self.id_column], row) for row in conn.execute(
                sa.select(self.entries).where(ident.in_(ids[i:i + VERIFY_FETCH_ROWS]))).mappings())
        return out

    @staticmethod
    def _link(seal_no: int, what: str, prev_hash: str, state: _VerifyState, problems: list[str]) -> None:
        """The number and link of the next seal (per-row or batch)."""
        if seal_no > state.expected_no:
            problems.append(f"seals {state.expected_no}..{seal_no - 1} missing (removed from the chain)")
        elif seal_no < state.expected_no:
            problems.append(f"seal {seal_no} ({what}) out of order: a seal numbered {state.expected_no - 1} "
                            "comes before it")
        if prev_hash != state.prev:
            problems.append(f"seal {seal_no} ({what}): link broken, previous hash differs (a seal was removed "
                            "or edited)")

    @classmethod
    def _check_row_seal(cls, seal: Any, state: _VerifyState, row: Any, problems: list[str]) -> None:
        """A per-row seal and the entry it names (None: the entry is gone)."""
        cls._link(seal["seal_no"], f"entry {seal['entry_id']}", seal["prev_hash"], state, problems)
        state.prev, state.expected_no = seal["entry_hash"], seal["seal_no"] + 1
        if row is None:
            problems.append(f"entry {seal['entry_id']} deleted (seal {seal['seal_no']})")
            return
        state.present += 1
        cols = seal["columns"].split(",")
        if any(c not in row for c in cols) or entry_hash(seal["prev_hash"], cols, row) != seal["entry_hash"]:
            problems.append(f"entry {seal['entry_id']} edited or reordered (seal {seal['seal_no']})")

    def _check_batch_seal(self, conn: Connection, seal: Any, state: _VerifyState, problems: list[str]) -> None:
        """A batch seal, and each entry it names against its digest."""
        no, ids_blob, digests = seal["seal_no"], bytes(seal["entry_ids"]), bytes(seal["digests"])
        ids = unpack_ids(ids_blob)
        what = f"entries {ids[0]}..{ids[-1]}" if ids else "no entries"
        self._link(no, what, seal["prev_hash"], state, problems)
        state.prev, state.expected_no = seal["seal_hash"], no + 1
        if (len(ids_blob) % ID_BYTES or len(ids) != seal["entry_count"] or len(digests) != DIGEST_BYTES * len(ids)
                or seal_hash(seal["prev_hash"], seal["columns"], ids_blob, digests) != seal["seal_hash"]):
            problems.append(f"seal {no} ({what}) edited: its hash differs from its contents")
            if len(digests) != DIGEST_BYTES * len(ids):
                return
        cols = seal["columns"].split(",")
        rows = self._rows_by_id(conn, ids)
        state.checked += len(ids)
        for k, i in enumerate(ids):
            row = rows.get(i)
            if row is None:
                problems.append(f"entry {i} deleted (seal {no})")
                continue
            state.present += 1
            if (any(c not in row for c in cols) or entry_digests(cols, [tuple([row[c] for c in cols])])
                    != digests[k * DIGEST_BYTES:(k + 1) * DIGEST_BYTES]):
                problems.append(f"entry {i} edited or reordered (seal {no})")

    def to_row_seals(self, conn: Connection) -> int:
        """For a downgrade to the code before batch seals: the entries of every batch seal sealed again
        as per-row seals continuing the per-row chain (same numbers per entry, same hashes the old
        sealer would have written), once verify finds the whole chain intact: re-sealing an edited
        entry would hide the edit, so a chain with problems is refused (ChainTampered). Returns the
        per-row seals written; the caller drops the batch seals' table."""
        _, problems, _ = self.verify(conn)
        if problems:
            raise ChainTampered(problems)
        s = self.seals.c
        head = conn.execute(sa.select(s.seal_no, s.entry_hash).order_by(s.seal_no.desc()).limit(1)).first()
        seal_no, prev = (int(head.seal_no), str(head.entry_hash)) if head else (0, GENESIS)
        written = 0
        for seal in self._batch_seals(conn):
            ids = unpack_ids(bytes(seal["entry_ids"]))
            cols = seal["columns"].split(",")
            rows = self._rows_by_id(conn, ids)
            hashes = chain_hashes(prev, cols, [tuple([rows[i][c] for c in cols]) for i in ids])
            conn.execute(self.seals.insert(), [
                {"seal_no": seal_no + 1 + k, "entry_id": i, "columns": seal["columns"], "prev_hash": p,
                 "entry_hash": h, "sealed_at": seal["sealed_at"]}
                for k, (i, p, h) in enumerate(zip(ids, [prev, *hashes[:-1]], hashes, strict=True))])
            seal_no, prev, written = seal_no + len(ids), hashes[-1], written + len(ids)
        return written

    def _row_seal_pages(self, conn: Connection) -> Iterator[Sequence[Any]]:
        """Every per-row seal in order, a page of VERIFY_FETCH_ROWS at a time (keyset: no open cursor
        while the entries are read)."""
        s, after = self.seals.c, 0
        while True:
            page = conn.execute(sa.select(self.seals).where(s.seal_no > after).order_by(s.seal_no)
                                .limit(VERIFY_FETCH_ROWS)).mappings().all()
            if not page:
                return
            yield page
            after = page[-1]["seal_no"]

    def _batch_seals(self, conn: Connection) -> Iterator[Any]:
        """Every batch seal in order, one at a time (each holds up to SEAL_BATCH_MAX entries)."""
        b, after = self.batches.c, 0
        while True:
            seal = conn.execute(sa.select(self.batches).where(b.seal_no > after).order_by(b.seal_no)
                                .limit(1)).mappings().first()
            if seal is None:
                return
            yield seal
            after = seal["seal_no"]


class ChainTampered(RuntimeError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("the audit chain does not verify (run `audit verify`): " + "; ".join(problems[:10]))
        self.problems = problems


@dataclass
class _VerifyState:
    expected_no: int = 1
    prev: str = GENESIS
    checked: int = 0   # entries named by a seal
    present: int = 0   # of those, still in the journal


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


SEAL_BATCHES_PER_PASS = 50  # default bound of a background pass: at most this many seals per chain


class Sealer:
    """The server's background sealer: seals new journal rows every interval_s
    (a database error is logged and retried at the next pass).

    Bounds: each seal (one transaction) takes at most `batch_max` rows, so that its Python work (reading
    and digesting them, under the interpreter lock the server's calls share) comes in slices of that
    size between database round trips; a background pass writes at most `batches_per_pass` seals per
    chain and leaves the rest to the next pass (a backlog after a pause does not hold the sealer for
    minutes). At stop, it seals everything."""

    def __init__(self, jobs: list[tuple[Chain, Engine]], interval_s: float, now: Any, *,
                 batch_max: int = SEAL_BATCH_MAX, batches_per_pass: int = SEAL_BATCHES_PER_PASS) -> None:
        import threading
        if not 1 <= batch_max <= SEAL_BATCH_MAX or batches_per_pass < 1:
            raise ValueError(f"batch_max must be 1..{SEAL_BATCH_MAX}, batches_per_pass positive")
        self._jobs, self._interval_s, self._now = jobs, interval_s, now
        self._batch_max, self._batches_per_pass = batch_max, batches_per_pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-sealer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._interval_s + 5)
        try:
            self.seal_once()  # what the drain's last calls journaled
        except sa.exc.SQLAlchemyError as exc:
            # The database is unreachable at stop: those rows stay unsealed until a later full pass (the
            # next start's), and the process's stop goes on (its pools closed, its exit status clean).
            import logging
            logging.getLogger("yindian.audit").warning("event=audit_final_seal_failed error=%s",
                                                       type(exc).__name__)

    def seal_once(self, lookback_ids: int | None = None, batches_max: int | None = None) -> int:
        """One pass over every chain (lookback_ids: see Chain.seal_pending; None: whole tables), at most
        batches_max seals per chain (None: until every row is sealed)."""
        total = 0
        for chain, engine in self._jobs:
            seals = 0
            while (batches_max is None or seals < batches_max) and (
                    n := chain.seal_pending(engine, self._now(), self._batch_max, lookback_ids=lookback_ids)):
                total += n
                seals += 1
        return total

    def _run(self) -> None:
        import logging
        log = logging.getLogger("yindian.audit")
        passes = 0
        while not self._stop.wait(self._interval_s):
            passes += 1
            try:
                self.seal_once(None if passes % FULL_PASS_EVERY == 0 else SEAL_LOOKBACK_IDS, self._batches_per_pass)
            except sa.exc.SQLAlchemyError as exc:
                log.warning("event=audit_seal_failed error=%s", type(exc).__name__)
