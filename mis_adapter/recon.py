"""Daily reconciliation (对账), DESIGN.md Money semantics 8: the rule that
classifies each payment of a bank's settlement day, and the set-based
storage that applies it to a whole day at once.

The rule (`classify`), per bank_serial, with pay/cancel pairs netted: a bank
record CANCELLED, like a MIS payment REVERSED or refused (TOMBSTONE), means
"no money moved".

    bank \\ MIS      absent      POSTED (same day)          REVERSED / TOMBSTONE
    POSTED          BANK_ONLY   MATCHED, or MISMATCH when   MISMATCH
                                account or amount differ
    CANCELLED       MATCHED     UTILITY_ONLY (MISMATCH when MATCHED
                                account or amount differ)
    absent          -           UTILITY_ONLY                MATCHED

A MIS payment with that serial settled on another day is a MISMATCH unless
neither side moved money. BANK_ONLY is posted in the MIS (same allocation as
a Pay, settlement date = the reconciled day); UTILITY_ONLY is reversed the way
Cancel does (reversed_on = the reconciled day); MISMATCH is flagged only. A
BANK_ONLY that cannot be posted (account unknown or closed, serial taken
meanwhile) or a UTILITY_ONLY that cannot be restored becomes a MISMATCH.

Each outcome's `amount_fen` sums the records' amounts (the bank's amount
when the bank sent the record, else the MIS amount). `net_settlement_fen` is
what the bank owes the utility for the day once the outcomes are applied:
the sum of the day's payments still POSTED in the MIS (MISMATCH lines count
at the MIS amount until people settle them by hand).

Storage: the bank's records are validated batch by batch and bulk-loaded
(COPY on PostgreSQL, executemany elsewhere) into a TEMPORARY staging table on
one connection, then matched with two joins against the day's payments (on
PostgreSQL first copied into a narrow temporary table); discrepancies are
written to `recon_lines`, the outcomes applied, and the day closed
(`reconciled_days`) in one transaction. Memory stays flat in the number of
records: nothing holds more than one batch or one page.

Concurrency: the closing transaction first inserts the reconciled_days row (a
second reconciliation of the day waits on it, then replays the stored
result), then locks the accounts of the day's posted payments (PostgreSQL,
MariaDB; SQLite has one writer): Cancel takes its account lock before it
looks at reconciled_days, so no cancel of the day can land between the
matching and the commit.

Must never: apply anything when the input is refused, correct a MISMATCH,
or change a day that is already closed."""
from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from mis_adapter.banks import lock_bank_day
from mis_adapter.db.base import table_of
from mis_adapter.db.core import BillRow, Customer, JournalEntry, Payment
from mis_adapter.db.recon import ReconciledDay, ReconLine, recon_staging
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.payments import PayCommand, post_payment_in_tx, reverse_payment_in_tx
from yindian_common import fields
from yindian_common.errors import InvalidField, Precondition, YinDianError

# ---- bounds ----
RECORDS_PER_BATCH_MAX = 10_000        # records in one incoming batch (stream message)
RECORDS_PER_DAY_MAX = 5_000_000       # records in one reconciliation
DISCREPANCIES_PER_MESSAGE = 500       # stored lines per outgoing batch / page read
APPLY_PAGE_ROWS = 1_000               # one-sided lines read per page while applying
DUPLICATES_NAMED_MAX = 20             # duplicate serials named in a refusal
DETAIL_MAX = 128
PG_TEMP_BUFFERS_MB = 512             # PostgreSQL temp_buffers of a reconciliation's session (staging in memory)
PG_MATCH_WORK_MEM_MB = 256           # PostgreSQL work_mem of the matching transaction: one day's hash join in memory

MATCHED, BANK_ONLY, UTILITY_ONLY, MISMATCH = "MATCHED", "BANK_ONLY", "UTILITY_ONLY", "MISMATCH"
OUTCOMES = (MATCHED, BANK_ONLY, UTILITY_ONLY, MISMATCH)
BANK_POSTED, BANK_CANCELLED = "POSTED", "CANCELLED"
_BANK_STATUSES = frozenset((BANK_POSTED, BANK_CANCELLED))
POSTED, REVERSED, TOMBSTONE = "POSTED", "REVERSED", "TOMBSTONE"
RECON_CHANNEL = "RECONCILE"           # channel of a payment posted by reconciliation (BANK_ONLY)

DETAIL_OTHER_DAY = "settled on another day in the MIS"
DETAIL_ACCOUNT = "account differs"
DETAIL_AMOUNT = "amount differs"
DETAIL_REVERSED = "reversed in the MIS, posted at the bank"
DETAIL_REFUSED = "refused in the MIS (its cancel arrived first), posted at the bank"
DETAIL_POSTED_NOW = "posted in the MIS by reconciliation"
DETAIL_REVERSED_NOW = "reversed in the MIS by reconciliation"

_SERIAL_RE = re.compile(r"[A-Za-z0-9-]{1,32}")

# A staged record: (line_no, bank_serial, account_no, amount_fen, status).
StagedRecord = tuple[int, str, str, int, str]


# ---- domain ----
@dataclass(frozen=True)
class MisPayment:
    bank_serial: str
    account_no: str
    amount_fen: int
    state: str
    settlement_date: dt.date


@dataclass(frozen=True)
class Discrepancy:
    bank_serial: str
    outcome: str
    bank_account_no: str
    mis_account_no: str
    bank_amount_fen: int
    mis_amount_fen: int
    bank_status: str
    mis_state: str
    detail: str
    bank_line_no: int = 0


@dataclass(frozen=True)
class OutcomeTotal:
    outcome: str
    count: int
    amount_fen: int


@dataclass(frozen=True)
class ReconSummary:
    bank_id: str
    settlement_date: dt.date
    totals: tuple[OutcomeTotal, ...]
    net_settlement_fen: int
    record_count: int
    reconciled_at: dt.datetime
    replayed: bool = False

    def total(self, outcome: str) -> OutcomeTotal:
        return next(t for t in self.totals if t.outcome == outcome)

    def to_json(self) -> str:
        return json.dumps({"bank_id": self.bank_id, "settlement_date": self.settlement_date.isoformat(),
                           "totals": [[t.outcome, t.count, t.amount_fen] for t in self.totals],
                           "net_settlement_fen": self.net_settlement_fen, "record_count": self.record_count,
                           "reconciled_at": self.reconciled_at.isoformat()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, replayed: bool) -> ReconSummary:
        d = json.loads(text)
        return cls(d["bank_id"], dt.date.fromisoformat(d["settlement_date"]),
                   tuple(OutcomeTotal(o, c, a) for o, c, a in d["totals"]), d["net_settlement_fen"],
                   d["record_count"], dt.datetime.fromisoformat(d["reconciled_at"]), replayed)


def classify(bank: StagedRecord | None, mis: MisPayment | None, day: dt.date) -> tuple[str, str]:
    """(outcome, detail) of one serial; the SQL in `_BANK_SIDE_SQL` and
    `_MIS_ONLY_SQL` is this rule, set-based (a test holds them equal)."""
    if bank is None:
        if mis is None:
            raise ValueError("classify needs at least one side")
        return (UTILITY_ONLY, DETAIL_REVERSED_NOW) if mis.state == POSTED else (MATCHED, "")
    _line, _serial, account, amount, status = bank
    if mis is None:
        return (BANK_ONLY, DETAIL_POSTED_NOW) if status == BANK_POSTED else (MATCHED, "")
    if mis.settlement_date != day:
        return (MATCHED, "") if status == BANK_CANCELLED and mis.state != POSTED else (MISMATCH, DETAIL_OTHER_DAY)
    if mis.state == POSTED:
        if mis.account_no != account:
            return MISMATCH, DETAIL_ACCOUNT
        if mis.amount_fen != amount:
            return MISMATCH, DETAIL_AMOUNT
        return (MATCHED, "") if status == BANK_POSTED else (UTILITY_ONLY, DETAIL_REVERSED_NOW)
    if status == BANK_CANCELLED:
        return MATCHED, ""
    return MISMATCH, DETAIL_REVERSED if mis.state == REVERSED else DETAIL_REFUSED


# Luhn over the 9-digit body by byte tables (the hot path of a million records):
# from the right, every other digit (positions 9, 7, 5, 3, 1) is doubled, minus 9 past 9.
_LUHN_DOUBLED = bytes((2 * (c - 48) - 9 if 2 * (c - 48) > 9 else 2 * (c - 48)) if 48 <= c <= 57 else 0
                      for c in range(256))
_LUHN_PLAIN = bytes((c - 48) if 48 <= c <= 57 else 0 for c in range(256))


def _account_ok(account: str) -> str:
    """'' when the account number is well formed, else what is wrong with it."""
    if len(account) != fields.ACCOUNT_NO_LEN or not account.isascii():
        return "must be 10 ASCII digits"
    raw = account.encode("ascii")
    if not raw.isdigit():
        return "must be 10 ASCII digits"
    total = sum(raw[0:9:2].translate(_LUHN_DOUBLED)) + sum(raw[1:9:2].translate(_LUHN_PLAIN))
    return "" if (10 - total % 10) % 10 == raw[9] - 48 else "check digit does not match"


def _record_ok(rec: StagedRecord) -> bool:
    """validate_record's verdict without building messages: the hot path."""
    _line, serial, account, amount, status = rec
    return (_SERIAL_RE.fullmatch(serial) is not None and serial.isascii() and not _account_ok(account)
            and fields.AMOUNT_MIN_FEN <= amount <= fields.AMOUNT_MAX_FEN and status in _BANK_STATUSES)


def validate_record(rec: StagedRecord, where: str) -> None:
    """Field rules of one bank record; `where` names it (records[12], line 14)."""
    _line, serial, account, amount, status = rec
    if not _SERIAL_RE.fullmatch(serial) or not serial.isascii():
        raise InvalidField(f"{where}.bank_serial", "must be 1-32 characters of A-Z a-z 0-9 -")
    problem = _account_ok(account)
    if problem:
        raise InvalidField(f"{where}.account_no", problem)
    if not fields.AMOUNT_MIN_FEN <= amount <= fields.AMOUNT_MAX_FEN:
        raise InvalidField(f"{where}.amount_fen",
                           f"must be between {fields.AMOUNT_MIN_FEN} and {fields.AMOUNT_MAX_FEN} fen")
    if status not in (BANK_POSTED, BANK_CANCELLED):
        raise InvalidField(f"{where}.status", "must be POSTED or CANCELLED")


# ---- statements, built once ----
T_PAY = table_of(Payment)
T_CUST = table_of(Customer)
T_BILL = table_of(BillRow)
T_JOURNAL = table_of(JournalEntry)
T_DAY = table_of(ReconciledDay)
T_LINE = table_of(ReconLine)
_b = sa.bindparam
_DAY = _b("day", type_=sa.Date)

_STORED_DAY = sa.select(T_DAY.c.summary_json).where(T_DAY.c.bank_id == _b("bank_id"),
                                                    T_DAY.c.settlement_date == _DAY)
_CLOSE_DAY = T_DAY.insert()
_STORE_SUMMARY = (T_DAY.update().where(T_DAY.c.bank_id == _b("k_bank"), T_DAY.c.settlement_date == _DAY)
                  .values(summary_json=_b("summary"), reconciled_at=_b("at")))
_STORED_LINES = (sa.select(T_LINE).where(T_LINE.c.bank_id == _b("bank_id"), T_LINE.c.settlement_date == _DAY,
                                         T_LINE.c.line_id > _b("after"))
                 .order_by(T_LINE.c.line_id).limit(_b("page")))
_LINES_TO_APPLY = (sa.select(T_LINE).where(T_LINE.c.bank_id == _b("bank_id"), T_LINE.c.settlement_date == _DAY,
                                           T_LINE.c.outcome.in_([BANK_ONLY, UTILITY_ONLY]),
                                           T_LINE.c.line_id > _b("after"))
                   .order_by(T_LINE.c.line_id).limit(_b("page")))
_DEMOTE_LINE = (T_LINE.update().where(T_LINE.c.line_id == _b("l_id"))
                .values(outcome=MISMATCH, detail=_b("why")))
_LINE_TOTALS = (sa.select(T_LINE.c.outcome, T_LINE.c.bank_status,
                          sa.func.count().label("n"), sa.func.coalesce(sa.func.sum(T_LINE.c.bank_amount_fen), 0)
                          .label("bank_fen"), sa.func.coalesce(sa.func.sum(T_LINE.c.mis_amount_fen), 0)
                          .label("mis_fen"))
                .where(T_LINE.c.bank_id == _b("bank_id"), T_LINE.c.settlement_date == _DAY)
                .group_by(T_LINE.c.outcome, T_LINE.c.bank_status))
_NET_POSTED = (sa.select(sa.func.coalesce(sa.func.sum(T_PAY.c.amount_fen), 0))
               .where(T_PAY.c.bank_id == _b("bank_id"), T_PAY.c.settlement_date == _DAY,
                      T_PAY.c.state == POSTED))
_PAYMENT_BY_SERIAL = sa.select(T_PAY).where(T_PAY.c.bank_id == _b("bank_id"), T_PAY.c.bank_serial == _b("serial"))
_LOCK_CUSTOMER = (sa.select(T_CUST.c.branch_code, T_CUST.c.tariff_class, T_CUST.c.status, T_CUST.c.prepaid_fen)
                  .where(T_CUST.c.account_no == _b("account_no")).with_for_update())

# The bank side: every staged record against the MIS payment with its serial,
# joined on the day's payments (a hash join over one day, never over the bank's
# whole history); a serial not found that day is looked up on any day by the
# unique (bank, serial) index. Only discrepancies are written; MATCHED is
# counted by difference.
_BANK_SIDE_SQL = """
INSERT INTO recon_lines (bank_id, settlement_date, bank_serial, outcome, bank_line_no, bank_account_no,
                         mis_account_no, bank_amount_fen, mis_amount_fen, bank_status, mis_state, detail)
SELECT :bank_id, :day, c.bank_serial, c.outcome, c.line_no, c.account_no, c.mis_account_no, c.amount_fen,
       c.mis_amount_fen, c.status, c.mis_state, c.detail
FROM (
  SELECT j.line_no, j.bank_serial, j.account_no, j.amount_fen, j.status,
         COALESCE(j.m_account, '') AS mis_account_no, COALESCE(j.m_amount, 0) AS mis_amount_fen,
         COALESCE(j.m_state, '') AS mis_state,
         CASE
           WHEN j.m_state IS NULL THEN CASE WHEN j.status = 'POSTED' THEN 'BANK_ONLY' ELSE 'MATCHED' END
           WHEN j.same_day IS NULL THEN
             CASE WHEN j.status = 'CANCELLED' AND j.m_state <> 'POSTED' THEN 'MATCHED' ELSE 'MISMATCH' END
           WHEN j.m_state = 'POSTED' THEN
             CASE WHEN j.m_account <> j.account_no OR j.m_amount <> j.amount_fen THEN 'MISMATCH'
                  WHEN j.status = 'POSTED' THEN 'MATCHED' ELSE 'UTILITY_ONLY' END
           WHEN j.status = 'CANCELLED' THEN 'MATCHED'
           ELSE 'MISMATCH'
         END AS outcome,
         CASE
           WHEN j.m_state IS NULL THEN :d_posted_now
           WHEN j.same_day IS NULL THEN :d_other_day
           WHEN j.m_state = 'POSTED' THEN
             CASE WHEN j.m_account <> j.account_no THEN :d_account
                  WHEN j.m_amount <> j.amount_fen THEN :d_amount ELSE :d_reversed_now END
           WHEN j.m_state = 'REVERSED' THEN :d_reversed
           ELSE :d_refused
         END AS detail
  FROM (
    SELECT s.line_no, s.bank_serial, s.account_no, s.amount_fen, s.status, p.payment_id AS same_day,
           CASE WHEN p.payment_id IS NULL THEN (SELECT q.state FROM payments q
                WHERE q.bank_id = :bank_id AND q.bank_serial = s.bank_serial) ELSE p.state END AS m_state,
           CASE WHEN p.payment_id IS NULL THEN (SELECT q.account_no FROM payments q
                WHERE q.bank_id = :bank_id AND q.bank_serial = s.bank_serial) ELSE p.account_no END AS m_account,
           CASE WHEN p.payment_id IS NULL THEN (SELECT q.amount_fen FROM payments q
                WHERE q.bank_id = :bank_id AND q.bank_serial = s.bank_serial) ELSE p.amount_fen END AS m_amount
    FROM recon_staging s
    LEFT JOIN {day_payments} p ON {day_join} p.bank_serial = s.bank_serial
  ) j
) c
WHERE c.outcome <> 'MATCHED'
ORDER BY c.line_no
"""

# The MIS side: the day's payments the bank did not send. POSTED ones are UTILITY_ONLY.
_MIS_ONLY_SQL = """
INSERT INTO recon_lines (bank_id, settlement_date, bank_serial, outcome, bank_line_no, bank_account_no,
                         mis_account_no, bank_amount_fen, mis_amount_fen, bank_status, mis_state, detail)
SELECT :bank_id, :day, p.bank_serial, 'UTILITY_ONLY', 0, '', p.account_no, 0, p.amount_fen,
       '', p.state, :d_reversed_now
FROM {day_payments} p
WHERE {day_where} p.state = 'POSTED'
  AND NOT EXISTS (SELECT 1 FROM recon_staging s WHERE s.bank_serial = p.bank_serial)
ORDER BY p.payment_id
"""

# The day's payments the bank did not send and that moved no money: MATCHED.
_MIS_ONLY_SETTLED_SQL = """
SELECT COUNT(*), COALESCE(SUM(p.amount_fen), 0)
FROM {day_payments} p
WHERE {day_where} p.state <> 'POSTED'
  AND NOT EXISTS (SELECT 1 FROM recon_staging s WHERE s.bank_serial = p.bank_serial)
"""

# Where "the day's payments" come from. PostgreSQL copies them once, after the
# accounts are locked, into a narrow temporary table (recon_day) that the joins
# read from memory; the others read them in place through the (bank, day) index.
_IN_PLACE = {"day_payments": "payments", "day_join": "p.bank_id = :bank_id AND p.settlement_date = :day AND",
             "day_where": "p.bank_id = :bank_id AND p.settlement_date = :day AND"}
_COPIED = {"day_payments": "recon_day", "day_join": "", "day_where": ""}
_COPY_DAY = sa.text("""
CREATE TEMPORARY TABLE recon_day AS
SELECT payment_id, bank_serial, state, account_no, amount_fen FROM payments
WHERE bank_id = :bank_id AND settlement_date = :day
""").bindparams(_DAY)


def _matching(where: dict[str, str]) -> tuple[sa.TextClause, sa.TextClause, sa.TextClause]:
    def text(template: str) -> sa.TextClause:
        sql = template.format(**where)
        return sa.text(sql).bindparams(_DAY) if ":day" in sql else sa.text(sql)

    return text(_BANK_SIDE_SQL), text(_MIS_ONLY_SQL), text(_MIS_ONLY_SETTLED_SQL)


_MATCHING = {"postgresql": _matching(_COPIED)}
_MATCHING_IN_PLACE = _matching(_IN_PLACE)

# Lock the accounts of the day's payments (PostgreSQL, MariaDB): a Cancel takes
# the account lock before it looks at reconciled_days, so once we hold these,
# no cancel of the day can slip in between our matching and our commit.
_LOCK_DAY_ACCOUNTS = sa.text("""
SELECT COUNT(*) FROM (
  SELECT c.account_no FROM customers c
  WHERE c.account_no IN (SELECT p.account_no FROM payments p
                         WHERE p.bank_id = :bank_id AND p.settlement_date = :day AND p.state = 'POSTED')
  FOR UPDATE
) locked
""").bindparams(_DAY)

_DUPLICATES = sa.text("""
SELECT bank_serial, MIN(line_no), MAX(line_no), COUNT(*) FROM recon_staging
GROUP BY bank_serial HAVING COUNT(*) > 1 ORDER BY MIN(line_no) LIMIT :n
""")

_DETAILS = {"d_posted_now": DETAIL_POSTED_NOW, "d_other_day": DETAIL_OTHER_DAY, "d_account": DETAIL_ACCOUNT,
            "d_amount": DETAIL_AMOUNT, "d_reversed_now": DETAIL_REVERSED_NOW, "d_reversed": DETAIL_REVERSED,
            "d_refused": DETAIL_REFUSED}


# ---- reading stored results ----
def stored_summary(engine: Engine, bank_id: str, day: dt.date) -> ReconSummary | None:
    with engine.connect().execution_options(read_only=True) as conn, conn.begin():
        return _stored_summary(conn, bank_id, day)


def _stored_summary(conn: Connection, bank_id: str, day: dt.date) -> ReconSummary | None:
    text = conn.execute(_STORED_DAY, {"bank_id": bank_id, "day": day}).scalar()
    return ReconSummary.from_json(text, replayed=True) if text else None


def stored_lines(engine: Engine, bank_id: str, day: dt.date,
                 page_rows: int = DISCREPANCIES_PER_MESSAGE) -> Iterator[list[Discrepancy]]:
    """The day's discrepancy lines in pages, in the order they were found."""
    after = 0
    while True:
        with engine.connect().execution_options(read_only=True) as conn, conn.begin():
            rows = conn.execute(_STORED_LINES, {"bank_id": bank_id, "day": day, "after": after,
                                                "page": page_rows}).all()
        if not rows:
            return
        yield [Discrepancy(r.bank_serial, r.outcome, r.bank_account_no, r.mis_account_no, r.bank_amount_fen,
                           r.mis_amount_fen, r.bank_status, r.mis_state, r.detail, r.bank_line_no) for r in rows]
        after = rows[-1].line_id


# ---- one reconciliation ----
class Reconciliation:
    """One bank's settlement day being reconciled, on one connection (the
    staging table is TEMPORARY, so it lives and dies with the connection).

        with Reconciliation(engine, bank_id, day, rates=..., now=...) as r:
            r.load(batch) ...            # validated, bulk-loaded; nothing applied
            r.check_trailer(count, total)
            summary = r.close_day()      # match, apply, store, commit
    """

    def __init__(self, engine: Engine, bank_id: str, day: dt.date, *, rates: LateFeeRates,
                 now: dt.datetime) -> None:
        self.engine = engine
        self.bank_id = bank_id
        self.day = day
        self.rates = rates
        self.now = now
        self.record_count = 0
        self.total_fen = 0
        self._conn: Connection | None = None
        self._dialect = engine.dialect.name
        self._copy: Any = None  # PostgreSQL: the COPY in progress while loading (its context, its writer)
        self._copy_writer: Any = None

    # -- lifetime --
    def __enter__(self) -> Reconciliation:
        conn = self.engine.connect()
        self._conn = conn
        try:
            # Loading touches only the temporary table: on SQLite a deferred BEGIN
            # keeps the database's write lock free while the bank streams.
            conn.execution_options(read_only=True)
            with conn.begin():
                if self._dialect == "postgresql":
                    self._tune_pg_session(conn)
                conn.exec_driver_sql(self._drop_staging_sql())
                recon_staging.create(conn)
                if self._dialect == "mysql":  # DDL commits there: index the empty table now
                    conn.exec_driver_sql("CREATE INDEX ix_recon_staging_serial ON recon_staging (bank_serial(32))")
            conn.begin()
        except BaseException:
            self.__exit__()
            raise
        return self

    @staticmethod
    def _tune_pg_session(conn: Connection) -> None:
        # Compiling these one-off plans (JIT) costs seconds more than it saves.
        conn.exec_driver_sql("SET jit = off")
        # One day's hash joins and aggregates in memory.
        conn.exec_driver_sql(f"SET work_mem = '{PG_MATCH_WORK_MEM_MB}MB'")
        # The staging table in memory: possible only before the session's first temporary
        # table (the session is discarded afterwards, see __exit__); else the default stands.
        try:
            with conn.begin_nested():
                conn.exec_driver_sql(f"SET temp_buffers = '{PG_TEMP_BUFFERS_MB}MB'")
        except DBAPIError:
            pass

    def __exit__(self, *exc: object) -> None:
        conn = self._conn
        self._conn = None
        if conn is None:
            return
        if self._copy is not None:  # refused mid-load: abandon the COPY with the session
            self._copy = self._copy_writer = None
            conn.invalidate()
            conn.close()
            return
        try:
            if conn.in_transaction():
                conn.rollback()
            if self._dialect == "postgresql":
                conn.invalidate()  # a fresh session next time: no staging table, no temp_buffers left behind
                return
            conn.execution_options(read_only=True)
            with conn.begin():
                conn.exec_driver_sql(self._drop_staging_sql())
        except Exception:
            conn.invalidate()  # a pooled connection must never keep a staging table
            raise
        finally:
            conn.close()

    def _drop_staging_sql(self) -> str:
        if self._dialect == "mysql":
            return "DROP TEMPORARY TABLE IF EXISTS recon_staging"
        if self._dialect == "postgresql":
            return "DROP TABLE IF EXISTS pg_temp.recon_staging"
        return "DROP TABLE IF EXISTS temp.recon_staging"

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("Reconciliation used outside its with-block")
        return self._conn

    # -- loading --
    def load(self, records: Sequence[StagedRecord], where: str = "records") -> None:
        """Validates and bulk-loads one batch. `where` names the records in errors:
        records[<line_no>] for a stream, or 'line <n>' for a file (where='line')."""
        if len(records) > RECORDS_PER_BATCH_MAX:
            raise InvalidField("batch.records", f"at most {RECORDS_PER_BATCH_MAX} records per batch")
        if self.record_count + len(records) > RECORDS_PER_DAY_MAX:
            raise InvalidField("batch.records", f"at most {RECORDS_PER_DAY_MAX} records per day")
        for rec in records:
            if not _record_ok(rec):
                validate_record(rec, _where(where, rec[0]))  # raises, naming the field
        total = sum(rec[3] for rec in records)
        self._bulk_insert(records)
        self.record_count += len(records)
        self.total_fen += total

    def _bulk_insert(self, records: Sequence[StagedRecord]) -> None:
        if not records:
            return
        dbapi = self.conn.connection.driver_connection
        if self._dialect == "postgresql":
            # One COPY for the whole stream, one block of text per batch (validated fields hold no
            # tab, newline or backslash): the server inserts while we validate the next batch.
            if self._copy is None:
                cursor = dbapi.cursor()  # type: ignore[union-attr]
                self._copy = cursor.copy(
                    "COPY recon_staging (line_no, bank_serial, account_no, amount_fen, status) FROM STDIN")
                self._copy_writer = self._copy.__enter__()
            self._copy_writer.write("".join(f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}\t{r[4]}\n" for r in records).encode("ascii"))
        elif self._dialect == "sqlite":
            dbapi.executemany("INSERT INTO temp.recon_staging VALUES (?, ?, ?, ?, ?)", records)  # type: ignore[union-attr]
        else:
            self.conn.execute(recon_staging.insert(), [
                {"line_no": r[0], "bank_serial": r[1], "account_no": r[2], "amount_fen": r[3], "status": r[4]}
                for r in records])

    def check_trailer(self, record_count: int, total_fen: int, field: str = "trailer") -> None:
        if record_count != self.record_count:
            raise InvalidField(f"{field}.record_count",
                               f"says {record_count} records, {self.record_count} were sent")
        if total_fen != self.total_fen:
            raise InvalidField(f"{field}.total_fen", f"says {total_fen} fen, the records add up to {self.total_fen}")

    def _finish_copy(self) -> None:
        if self._copy is not None:
            copy, self._copy, self._copy_writer = self._copy, None, None
            copy.__exit__(None, None, None)

    def _index_staging(self, where: str) -> None:
        """Refuses duplicate serials, naming their lines. On SQLite a unique index does it
        and serves the joins; PostgreSQL hashes (an index build would sort by collation)."""
        self._finish_copy()
        conn = self.conn
        if self._dialect != "sqlite":
            self._refuse_duplicates(where)
            if self._dialect == "postgresql":
                conn.exec_driver_sql("ANALYZE recon_staging")  # autovacuum never sees temporary tables
            return
        try:
            with conn.begin_nested():
                conn.exec_driver_sql("CREATE UNIQUE INDEX ix_recon_staging_serial ON recon_staging (bank_serial)")
        except IntegrityError:
            self._refuse_duplicates(where)
            raise

    def _refuse_duplicates(self, where: str) -> None:
        dups = self.conn.execute(_DUPLICATES, {"n": DUPLICATES_NAMED_MAX}).all()
        if dups:
            named = "; ".join(f"{s} at {_where(where, lo)} and {_where(where, hi)}"
                              + (f" ({n} times)" if n > 2 else "") for s, lo, hi, n in dups)
            raise InvalidField(f"{where}.bank_serial", f"duplicate serials: {named}")

    # -- closing the day --
    def close_day(self, where: str = "records") -> ReconSummary:
        """Matches, applies the outcomes and closes the day in one transaction;
        returns the stored result instead when the day is already closed."""
        summary = self.prepare_close(where)
        self.commit()
        return summary

    def commit(self) -> None:
        """Commits a close that prepare_close left open (nothing to do after a replay)."""
        if self.conn.in_transaction():
            self.conn.commit()

    def prepare_close(self, where: str = "records") -> ReconSummary:
        """close_day without the commit: the day's transaction stays open (its bank-day
        lock held) until commit() or the end of the with-block (rollback), so that a
        reconciliation across branch databases closes all of them or none
        (mis_adapter.recon_branches). A stored result is returned with no transaction open."""
        conn = self.conn
        self._index_staging(where)
        conn.commit()
        conn.execution_options(read_only=False)
        key = {"bank_id": self.bank_id, "day": self.day}
        try:
            conn.begin()
            try:
                # No payment or cancel of this bank commits while we match and close (banks.lock_bank_day).
                lock_bank_day(conn, self.bank_id, exclusive=True)
                stored = _stored_summary(conn, self.bank_id, self.day)
                if stored is not None:
                    conn.rollback()
                    return stored
                # Taken first: a concurrent reconciliation of the day waits here, then replays ours.
                conn.execute(_CLOSE_DAY, {"bank_id": self.bank_id, "settlement_date": self.day,
                                          "reconciled_at": self.now, "summary_json": ""})
                if self._dialect != "sqlite":
                    conn.execute(_LOCK_DAY_ACCOUNTS, key)
                if self._dialect == "postgresql":
                    conn.execute(_COPY_DAY, key)
                    conn.exec_driver_sql("ANALYZE recon_day")
                bank_side, mis_only, mis_only_settled = _MATCHING.get(self._dialect, _MATCHING_IN_PLACE)
                conn.execute(bank_side, {**key, **_DETAILS})
                conn.execute(mis_only, {**key, **_DETAILS})
                settled_n, settled_fen = conn.execute(mis_only_settled, key).one()
                self._apply_outcomes()
                summary = self._summary(int(settled_n), int(settled_fen))
                conn.execute(_STORE_SUMMARY, {"k_bank": self.bank_id, "day": self.day, "summary": summary.to_json(),
                                              "at": self.now})
                conn.execute(T_JOURNAL.insert(), {
                    "at": self.now, "bank_id": self.bank_id, "rpc": "RECONCILE", "serial": self.day.isoformat(),
                    "original_serial": "", "account_no": "", "amount_fen": summary.net_settlement_fen,
                    "outcome": "DAY_CLOSED", "payment_id": None})
                return summary
            except BaseException:
                conn.rollback()
                raise
        except IntegrityError:
            # Another reconciliation of the same day committed first: answer with its result.
            with conn.begin():
                stored = _stored_summary(conn, self.bank_id, self.day)
            if stored is None:
                raise
            return stored

    def _summary(self, settled_n: int, settled_fen: int) -> ReconSummary:
        conn = self.conn
        counts = {o: [0, 0] for o in OUTCOMES}
        bank_side_n = bank_side_fen = 0
        for r in conn.execute(_LINE_TOTALS, {"bank_id": self.bank_id, "day": self.day}):
            from_bank = r.bank_status != ""
            fen = int(r.bank_fen) if from_bank else int(r.mis_fen)
            counts[r.outcome][0] += int(r.n)
            counts[r.outcome][1] += fen
            if from_bank:
                bank_side_n += int(r.n)
                bank_side_fen += fen
        counts[MATCHED] = [self.record_count - bank_side_n + settled_n, self.total_fen - bank_side_fen + settled_fen]
        net = int(conn.execute(_NET_POSTED, {"bank_id": self.bank_id, "day": self.day}).scalar_one())
        return ReconSummary(self.bank_id, self.day, tuple(OutcomeTotal(o, *counts[o]) for o in OUTCOMES), net,
                            self.record_count, self.now)

    def _apply_outcomes(self) -> None:
        """BANK_ONLY lines are posted, UTILITY_ONLY ones reversed, in the order found;
        one that cannot be applied is demoted to MISMATCH, saying why."""
        conn = self.conn
        after = 0
        while True:
            page = conn.execute(_LINES_TO_APPLY, {"bank_id": self.bank_id, "day": self.day, "after": after,
                                                  "page": APPLY_PAGE_ROWS}).all()
            if not page:
                return
            for line in page:
                try:
                    with conn.begin_nested():
                        if line.outcome == BANK_ONLY:
                            self._post(line)
                        else:
                            self._reverse(line)
                except (YinDianError, IntegrityError) as exc:
                    why = exc.message if isinstance(exc, YinDianError) else "serial taken meanwhile"
                    conn.execute(_DEMOTE_LINE, {"l_id": line.line_id,
                                                "why": f"not applied: {why}"[:DETAIL_MAX]})
            after = page[-1].line_id

    def _journal(self, serial: str, account_no: str, amount_fen: int, outcome: str, payment_id: int) -> None:
        self.conn.execute(T_JOURNAL.insert(), {
            "at": self.now, "bank_id": self.bank_id, "rpc": "RECONCILE", "serial": serial, "original_serial": "",
            "account_no": account_no, "amount_fen": amount_fen, "outcome": outcome, "payment_id": payment_id})

    def _reverse(self, line: sa.Row) -> None:  # type: ignore[type-arg]
        conn = self.conn
        p = conn.execute(_PAYMENT_BY_SERIAL, {"bank_id": self.bank_id, "serial": line.bank_serial}).one()
        conn.execute(_LOCK_CUSTOMER, {"account_no": p.account_no}).first()
        # reversed_on is the reconciled day: the payment never happened at the bank that day.
        reverse_payment_in_tx(conn, p, self.now, self.day, f"RECON-{self.day:%Y%m%d}")
        self._journal(line.bank_serial, p.account_no or "", p.amount_fen, "UTILITY_ONLY_REVERSED", p.payment_id)

    def _post(self, line: sa.Row) -> None:  # type: ignore[type-arg]
        """A Pay of the reconciled day, inside this transaction: same allocation rules
        (allocation.allocate_payment over late fees as of the settlement day)."""
        conn = self.conn
        account_no, amount_fen, day = line.bank_account_no, line.bank_amount_fen, self.day
        cust = conn.execute(_LOCK_CUSTOMER, {"account_no": account_no}).first()
        if cust is None:
            raise Precondition(f"account {account_no} not found", reason="ACCOUNT_NOT_FOUND")
        if cust.status != "OPEN":
            raise Precondition(f"account {account_no} is closed", reason="ACCOUNT_CLOSED")
        cmd = PayCommand(self.bank_id, line.bank_serial, account_no, amount_fen, channel=RECON_CHANNEL)
        pk = post_payment_in_tx(conn, self.rates, cmd, cust, fee_day=day, settlement=day, now=self.now).payment_pk
        self._journal(line.bank_serial, account_no, amount_fen, "BANK_ONLY_POSTED", pk)


def _where(where: str, line_no: int) -> str:
    return f"line {line_no}" if where == "line" else f"{where}[{line_no}]"
