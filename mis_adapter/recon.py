"""Daily reconciliation (对账), DESIGN.md Money semantics 8: closing one bank's
settlement day. The job is split by module:

    mis_adapter/matching.py        the outcome rule: ONE decision table (pure);
                                   `classify` and the SQL CASE are generated from it
    mis_adapter/recon_staging.py   loading: field rules, bulk load into a TEMPORARY table
    mis_adapter/recon_outcomes.py  matching set-based and applying BANK_ONLY / UTILITY_ONLY
    mis_adapter/recon.py           (here) the day close: one transaction, the summary,
                                   the stored result and its lines

Each outcome's `amount_fen` sums the records' amounts (the bank's amount
when the bank sent the record, else the MIS amount). `net_settlement_fen` is
what the bank owes the utility for the day once the outcomes are applied:
the sum of the day's payments still POSTED in the MIS (MISMATCH lines count
at the MIS amount until people settle them by hand).

Storage: the bank's records are validated batch by batch and bulk-loaded into
a TEMPORARY staging table on one connection, then matched against the day's
payments (PostgreSQL: one hash full join; elsewhere a join per side);
discrepancies are written to `recon_lines`, the outcomes applied, and
the day closed (`reconciled_days`) in one transaction. Memory stays flat in
the number of records: nothing holds more than one batch or one page.

Concurrency: the closing transaction takes the bank-day lock exclusive
(banks.lock_bank_day; every pay, cancel, feed posting and refund of the bank
takes it shared before anything else), so no payment or cancel of the day
can land between the matching and the commit; then it inserts the
reconciled_days row (a second reconciliation of the day waits on it, then
replays the stored result). Applying an outcome locks its accounts, as a Pay
does.

Must never: apply anything when the input is refused, correct a MISMATCH,
or change a day that is already closed."""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from mis_adapter import refunds
from mis_adapter.banks import lock_bank_day
from mis_adapter.db.base import table_of
from mis_adapter.db.core import JournalEntry, Payment
from mis_adapter.db.recon import ReconciledDay, ReconLine
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.matching import (
    BANK_CANCELLED,
    BANK_ONLY,
    BANK_POSTED,
    DETAIL_ACCOUNT,
    DETAIL_AMOUNT,
    DETAIL_OTHER_DAY,
    DETAIL_POSTED_NOW,
    DETAIL_REFUSED,
    DETAIL_REVERSED,
    DETAIL_REVERSED_NOW,
    MATCHED,
    MISMATCH,
    OUTCOMES,
    POSTED,
    REVERSED,
    TOMBSTONE,
    UTILITY_ONLY,
    MisPayment,
    StagedRecord,
    classify,
)
from mis_adapter.recon_outcomes import RECON_CHANNEL, OutcomeApplier, match_day
from mis_adapter.recon_staging import (
    RECORDS_PER_BATCH_MAX,
    RECORDS_PER_DAY_MAX,
    Staging,
    record_ok,
    records_ok,
    validate_record,
    where_of,
)
from yindian_common.crash_points import crash_point
from yindian_common.errors import InvalidField

# Names other modules read from here (the rule lives in matching, loading in recon_staging).
__all__ = [
    "BANK_CANCELLED", "BANK_ONLY", "BANK_POSTED", "DETAIL_ACCOUNT", "DETAIL_AMOUNT", "DETAIL_OTHER_DAY",
    "DETAIL_POSTED_NOW", "DETAIL_REFUSED", "DETAIL_REVERSED", "DETAIL_REVERSED_NOW", "DISCREPANCIES_PER_MESSAGE",
    "MATCHED", "MISMATCH", "OUTCOMES", "POSTED", "RECON_CHANNEL", "RECORDS_PER_BATCH_MAX", "RECORDS_PER_DAY_MAX",
    "REVERSED", "TOMBSTONE", "UTILITY_ONLY", "Discrepancy", "MisPayment", "OutcomeTotal", "ReconSummary",
    "Reconciliation", "StagedRecord", "classify", "stored_lines", "stored_summary", "validate_record",
]

DISCREPANCIES_PER_MESSAGE = 500       # stored lines per outgoing batch / page read

log = logging.getLogger("mis_adapter.recon")


# ---- the day's result ----
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
    # refunds to the bank acknowledged with this settlement date (mis_adapter.refunds): netted in net_settlement_fen
    refund_count: int = 0
    refund_fen: int = 0

    def total(self, outcome: str) -> OutcomeTotal:
        return next(t for t in self.totals if t.outcome == outcome)

    def to_json(self) -> str:
        return json.dumps({"bank_id": self.bank_id, "settlement_date": self.settlement_date.isoformat(),
                           "totals": [[t.outcome, t.count, t.amount_fen] for t in self.totals],
                           "net_settlement_fen": self.net_settlement_fen, "record_count": self.record_count,
                           "reconciled_at": self.reconciled_at.isoformat(), "refund_count": self.refund_count,
                           "refund_fen": self.refund_fen}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, replayed: bool) -> ReconSummary:
        d = json.loads(text)
        return cls(d["bank_id"], dt.date.fromisoformat(d["settlement_date"]),
                   tuple(OutcomeTotal(o, c, a) for o, c, a in d["totals"]), d["net_settlement_fen"],
                   d["record_count"], dt.datetime.fromisoformat(d["reconciled_at"]), replayed,
                   d.get("refund_count", 0), d.get("refund_fen", 0))


# ---- statements, built once ----
T_PAY = table_of(Payment)
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
_LINE_TOTALS = (sa.select(T_LINE.c.outcome, T_LINE.c.bank_status,
                          sa.func.count().label("n"), sa.func.coalesce(sa.func.sum(T_LINE.c.bank_amount_fen), 0)
                          .label("bank_fen"), sa.func.coalesce(sa.func.sum(T_LINE.c.mis_amount_fen), 0)
                          .label("mis_fen"))
                .where(T_LINE.c.bank_id == _b("bank_id"), T_LINE.c.settlement_date == _DAY)
                .group_by(T_LINE.c.outcome, T_LINE.c.bank_status))
_NET_POSTED = (sa.select(sa.func.coalesce(sa.func.sum(T_PAY.c.amount_fen), 0))
               .where(T_PAY.c.bank_id == _b("bank_id"), T_PAY.c.settlement_date == _DAY,
                      T_PAY.c.state == POSTED))


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


def nothing_to_confirm() -> None:
    """A close that nothing can withdraw (a file read to its end)."""


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
        self._staging: Staging | None = None
        self._dialect = engine.dialect.name
        # wall seconds per stage of this reconciliation (logged once the day is closed; bench-recon prints them)
        self.stages: dict[str, float] = {}

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - started

    # -- lifetime --
    def __enter__(self) -> Reconciliation:
        conn = self.engine.connect()
        self._conn = conn
        try:
            # Loading touches only the temporary table: on SQLite a deferred BEGIN
            # keeps the database's write lock free while the bank streams.
            conn.execution_options(read_only=True)
            self._staging = Staging(conn)
            with conn.begin():
                self._staging.create()
            conn.begin()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        conn, staging = self._conn, self._staging
        self._conn = self._staging = None
        if conn is None:
            return
        if staging is not None and staging.copying:  # refused mid-load: abandon the COPY with the session
            staging.abandon()
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
                conn.exec_driver_sql(Staging(conn).drop_sql())
        except Exception:
            conn.invalidate()  # a pooled connection must never keep a staging table
            raise
        finally:
            conn.close()

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("Reconciliation used outside its with-block")
        return self._conn

    @property
    def staging(self) -> Staging:
        if self._staging is None:
            raise RuntimeError("Reconciliation used outside its with-block")
        return self._staging

    # -- loading --
    def load(self, records: Sequence[StagedRecord], where: str = "records") -> None:
        """Validates and bulk-loads one batch. `where` names the records in errors:
        records[<line_no>] for a stream, or 'line <n>' for a file (where='line')."""
        if len(records) > RECORDS_PER_BATCH_MAX:
            raise InvalidField("batch.records", f"at most {RECORDS_PER_BATCH_MAX} records per batch")
        if self.record_count + len(records) > RECORDS_PER_DAY_MAX:
            raise InvalidField("batch.records", f"at most {RECORDS_PER_DAY_MAX} records per day")
        if not records_ok(records):  # some record is bad: the first one is named, as one by one
            for rec in records:
                if not record_ok(rec):
                    validate_record(rec, where_of(where, rec[0]))  # raises, naming the field
        total = sum(rec[3] for rec in records)
        with self._timed("copy"):
            self.staging.insert(records)
        self.record_count += len(records)
        self.total_fen += total

    def check_trailer(self, record_count: int, total_fen: int, field: str = "trailer") -> None:
        if record_count != self.record_count:
            raise InvalidField(f"{field}.record_count",
                               f"says {record_count} records, {self.record_count} were sent")
        if total_fen != self.total_fen:
            raise InvalidField(f"{field}.total_fen", f"says {total_fen} fen, the records add up to {self.total_fen}")

    # -- closing the day --
    def close_day(self, where: str = "records", confirm: Callable[[], None] = nothing_to_confirm) -> ReconSummary:
        """Matches, applies the outcomes and closes the day in one transaction;
        returns the stored result instead when the day is already closed.
        `confirm` runs just before the commit and refuses (raises) when the
        records are no longer wanted (the bank's stream was cancelled): the
        transaction is then rolled back and nothing of the day is applied."""
        summary = self.prepare_close(where)
        if not summary.replayed:
            confirm()
        self.commit()
        return summary

    def commit(self) -> None:
        """Commits a close that prepare_close left open (nothing to do after a replay)."""
        if self.conn.in_transaction():
            with self._timed("commit"):
                self.conn.commit()
            log.info("event=recon_stages bank=%s day=%s records=%d %s", self.bank_id, self.day, self.record_count,
                     " ".join(f"{k}_s={v:.3f}" for k, v in self.stages.items()))

    def prepare_close(self, where: str = "records") -> ReconSummary:
        """close_day without the commit: the day's transaction stays open (its bank-day
        lock held) until commit() or the end of the with-block (rollback), so that a
        reconciliation across branch databases closes all of them or none
        (mis_adapter.recon_branches). A stored result is returned with no transaction open."""
        conn = self.conn
        with self._timed("copy_end"):
            self.staging.finish_copy()
        with self._timed("check"):
            self.staging.index(where)
            conn.commit()
        conn.execution_options(read_only=False)
        try:
            conn.begin()
            try:
                # No payment or cancel of this bank commits while we match and close (banks.lock_bank_day).
                with self._timed("lock"):
                    lock_bank_day(conn, self.bank_id, exclusive=True)
                stored = _stored_summary(conn, self.bank_id, self.day)
                if stored is not None:
                    self._refuse_duplicates_once_more(where)  # refused input is refused, closed day or not
                    conn.rollback()
                    return stored
                # Taken first: a concurrent reconciliation of the day waits here, then replays ours.
                conn.execute(_CLOSE_DAY, {"bank_id": self.bank_id, "settlement_date": self.day,
                                          "reconciled_at": self.now, "summary_json": ""})
                with self._timed("match"):
                    settled_n, settled_fen, duplicates = match_day(conn, self.bank_id, self.day, self.record_count)
                if duplicates:  # the lines just written go with the rollback
                    self.staging.refuse_duplicates(where)
                    raise RuntimeError("the matching pass saw a repeated serial that the staging does not hold")
                crash_point("mis.recon_mid_apply")
                with self._timed("apply"):
                    OutcomeApplier(conn, self.bank_id, self.day, rates=self.rates, now=self.now).apply()
                with self._timed("summary"):
                    summary = self._summary(settled_n, settled_fen)
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
                if stored is not None:
                    self._refuse_duplicates_once_more(where)
            if stored is None:
                raise
            return stored

    def _refuse_duplicates_once_more(self, where: str) -> None:
        """On PostgreSQL duplicates are found by the matching pass, which a closed day never
        runs: the records are checked on their own before its stored result is answered."""
        if self._dialect == "postgresql":
            self.staging.refuse_duplicates(where)

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
        # Refunds the utility paid back this day (under the exclusive bank-day lock: none can join the day now).
        refund_n, refund_fen = refunds.day_totals(conn, self.bank_id, self.day)
        return ReconSummary(self.bank_id, self.day, tuple(OutcomeTotal(o, *counts[o]) for o in OUTCOMES),
                            net - refund_fen, self.record_count, self.now, refund_count=refund_n,
                            refund_fen=refund_fen)

