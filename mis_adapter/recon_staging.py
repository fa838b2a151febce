"""Loading a bank's settlement day for reconciliation: each record checked by
the wire's field rules (yindian_common.fields), then bulk-loaded (COPY on
PostgreSQL, executemany elsewhere) into a TEMPORARY staging table on one
connection, and duplicate serials refused naming their lines. Nothing here
touches a MIS table; memory stays flat (one batch at a time)."""
from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from mis_adapter.db.recon import recon_staging
from mis_adapter.matching import BANK_STATUSES, StagedRecord
from yindian_common import fields
from yindian_common.errors import InvalidField

# ---- bounds ----
RECORDS_PER_BATCH_MAX = 10_000        # records in one incoming batch (stream message)
RECORDS_PER_DAY_MAX = 5_000_000       # records in one reconciliation
DUPLICATES_NAMED_MAX = 20             # duplicate serials named in a refusal
PG_TEMP_BUFFERS_MB = 512             # PostgreSQL temp_buffers of a reconciliation's session (staging in memory)
PG_MATCH_WORK_MEM_MB = 256           # PostgreSQL work_mem of the matching transaction: one day's hash join in memory

_DUPLICATES = sa.text("""
SELECT bank_serial, MIN(line_no), MAX(line_no), COUNT(*) FROM recon_staging
GROUP BY bank_serial HAVING COUNT(*) > 1 ORDER BY MIN(line_no) LIMIT :n
""")

_COLUMN = tuple(itemgetter(k) for k in range(5))  # StagedRecord's fields


def record_ok(rec: StagedRecord) -> bool:
    """validate_record's verdict without building messages: the hot path."""
    _line, serial, account, amount, status = rec
    return (fields.serial_ok(serial) and fields.account_no_ok(account)
            and fields.AMOUNT_MIN_FEN <= amount <= fields.AMOUNT_MAX_FEN and status in BANK_STATUSES)


def records_ok(records: Sequence[StagedRecord]) -> bool:
    """all(record_ok(r) for r in records), column by column in a few C-level passes
    (fields.serials_ok, fields.account_nos_ok): the hot path of a stream's batch."""
    if not records:
        return True
    # Columns by itemgetter, not zip(*records): zip's one iterator per record wakes the garbage collector.
    serials, accounts, amounts, statuses = (list(map(_COLUMN[k], records)) for k in range(1, 5))
    return (fields.serials_ok(serials) and fields.account_nos_ok(accounts)
            and min(amounts) >= fields.AMOUNT_MIN_FEN and max(amounts) <= fields.AMOUNT_MAX_FEN
            and BANK_STATUSES.issuperset(statuses))


def validate_record(rec: StagedRecord, where: str) -> None:
    """Field rules of one bank record; `where` names it (records[12], line 14)."""
    _line, serial, account, amount, status = rec
    fields.serial(serial, f"{where}.bank_serial")
    fields.account_no(account, f"{where}.account_no")
    fields.amount_fen(amount, f"{where}.amount_fen")
    if status not in BANK_STATUSES:
        raise InvalidField(f"{where}.status", "must be POSTED or CANCELLED")


def where_of(where: str, line_no: int) -> str:
    """How a refusal names a record: 'line 14' in a file, records[12] on a stream."""
    return f"line {line_no}" if where == "line" else f"{where}[{line_no}]"


class Staging:
    """The TEMPORARY table recon_staging on one connection: it lives and dies with it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.dialect = conn.dialect.name
        self._copy: Any = None  # PostgreSQL: the COPY in progress while loading (its context, its writer)
        self._copy_writer: Any = None

    @property
    def copying(self) -> bool:
        """A COPY is open: the session must be abandoned, not reused."""
        return self._copy is not None

    def abandon(self) -> None:
        self._copy = self._copy_writer = None

    def create(self) -> None:
        """Inside a transaction: a fresh, empty staging table (tuning the PostgreSQL session first)."""
        conn = self.conn
        if self.dialect == "postgresql":
            self._tune_pg_session(conn)
        conn.exec_driver_sql(self.drop_sql())
        recon_staging.create(conn)
        if self.dialect == "mysql":  # DDL commits there: index the empty table now
            conn.exec_driver_sql("CREATE INDEX ix_recon_staging_serial ON recon_staging (bank_serial(32))")

    @staticmethod
    def _tune_pg_session(conn: Connection) -> None:
        # Compiling these one-off plans (JIT) costs seconds more than it saves.
        conn.exec_driver_sql("SET jit = off")
        # One day's hash joins and aggregates in memory.
        conn.exec_driver_sql(f"SET work_mem = '{PG_MATCH_WORK_MEM_MB}MB'")
        # The staging table in memory: possible only before the session's first temporary
        # table (the session is discarded afterwards, see Reconciliation.__exit__); else the default stands.
        try:
            with conn.begin_nested():
                conn.exec_driver_sql(f"SET temp_buffers = '{PG_TEMP_BUFFERS_MB}MB'")
        except DBAPIError:
            pass

    def drop_sql(self) -> str:
        if self.dialect == "mysql":
            return "DROP TEMPORARY TABLE IF EXISTS recon_staging"
        if self.dialect == "postgresql":
            return "DROP TABLE IF EXISTS pg_temp.recon_staging"
        return "DROP TABLE IF EXISTS temp.recon_staging"

    def insert(self, records: Sequence[StagedRecord]) -> None:
        """Bulk-loads validated records."""
        if not records:
            return
        dbapi = self.conn.connection.driver_connection
        if self.dialect == "postgresql":
            # One COPY for the whole stream, one block of text per batch (validated fields hold no
            # tab, newline or backslash): the server inserts while we validate the next batch.
            if self._copy is None:
                cursor = dbapi.cursor()  # type: ignore[union-attr]
                self._copy = cursor.copy(
                    "COPY recon_staging (line_no, bank_serial, account_no, amount_fen, status) FROM STDIN")
                self._copy_writer = self._copy.__enter__()
            self._copy_writer.write("".join(f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}\t{r[4]}\n" for r in records).encode("ascii"))
        elif self.dialect == "sqlite":
            dbapi.executemany("INSERT INTO temp.recon_staging VALUES (?, ?, ?, ?, ?)", records)  # type: ignore[union-attr]
        else:
            self.conn.execute(recon_staging.insert(), [
                {"line_no": r[0], "bank_serial": r[1], "account_no": r[2], "amount_fen": r[3], "status": r[4]}
                for r in records])

    def finish_copy(self) -> None:
        """Ends the COPY of the stream (PostgreSQL): the server has every record once this returns."""
        if self._copy is not None:
            copy, self._copy, self._copy_writer = self._copy, None, None
            copy.__exit__(None, None, None)

    def index(self, where: str) -> None:
        """Refuses duplicate serials, naming their lines. On SQLite a unique index does it
        and serves the joins; on MariaDB a GROUP BY. On PostgreSQL nothing here: the
        day's one matching pass tells whether a serial repeats (recon_outcomes.match_day),
        and the close calls refuse_duplicates then; the staging needs no planner
        statistics either (its joins are a hash full join and per-record index lookups
        whatever its size), so no ANALYZE."""
        self.finish_copy()
        conn = self.conn
        if self.dialect == "postgresql":
            return
        if self.dialect != "sqlite":
            self.refuse_duplicates(where)
            return
        try:
            with conn.begin_nested():
                conn.exec_driver_sql("CREATE UNIQUE INDEX ix_recon_staging_serial ON recon_staging (bank_serial)")
        except IntegrityError:
            self.refuse_duplicates(where)
            raise

    def refuse_duplicates(self, where: str) -> None:
        """Raises InvalidField naming the first repeated serials and their lines, if any."""
        dups = self.conn.execute(_DUPLICATES, {"n": DUPLICATES_NAMED_MAX}).all()
        if dups:
            named = "; ".join(f"{s} at {where_of(where, lo)} and {where_of(where, hi)}"
                              + (f" ({n} times)" if n > 2 else "") for s, lo, hi, n in dups)
            raise InvalidField(f"{where}.bank_serial", f"duplicate serials: {named}")
