"""Reconciliation of a bank's day across branch databases (DESIGN.md Money
semantics 8, with --branch-db): one Reconciliation per branch database, the
bank's records routed to the database that holds (or would hold) each serial,
every branch's close prepared in its own open transaction and committed only
when all are prepared, then the day recorded closed in the front database.

Routing a record: a serial the front registry knows goes to its home branch
(its payment, reversal or tombstone is there and nowhere else); an unknown
one goes to its account's branch (where BANK_ONLY posts it), and a serial
repeated in the records follows its first occurrence, so the branch's own
staging refuses the duplicate naming both lines. BANK_ONLY serials are
claimed in the registry before any branch closes, so that no Pay can post
the same serial in another branch afterwards.

All-or-nothing: a branch that fails while preparing (a refused record, a
database down) rolls every branch back: the day stays open everywhere and
the bank's rerun does it all. Only a failure between the branches' commits
(a database lost in that instant) leaves some branches closed; the rerun
replays their stored results and closes the rest. The day is reported
closed (`stored_summary`) only once the front row is written.

Reports sum across branches: counts and fen per outcome, record count, the
refunds acknowledged for the day (each branch nets its own) and net settlement; the discrepancy lines are replayed branch by branch, the
primary first. Memory: one batch at a time, plus the serials the registry
does not know (bounded by UNCLAIMED_SERIALS_MAX)."""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from mis_adapter import recon, registry
from mis_adapter.db.base import table_of
from mis_adapter.db.front import FrontReconDay
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.recon import Discrepancy, OutcomeTotal, Reconciliation, ReconSummary, StagedRecord
from mis_adapter.registry import Claim
from mis_adapter.routing import BranchRouter
from yindian_common.errors import InvalidField, Unavailable

UNCLAIMED_SERIALS_MAX = 200_000   # serials in one day's records that the front registry does not know

T_DAY = table_of(FrontReconDay)
_STORED = sa.select(T_DAY.c.summary_json).where(T_DAY.c.bank_id == sa.bindparam("bank_id"),
                                                T_DAY.c.settlement_date == sa.bindparam("day", type_=sa.Date))


def _front(router: BranchRouter) -> Engine:
    if router.front is None:
        raise RuntimeError("recon_branches used without a front database")
    return router.front


def stored_summary(router: BranchRouter, bank_id: str, day: dt.date) -> ReconSummary | None:
    """The day's summed result once every branch closed it, else None."""
    with _front(router).connect().execution_options(read_only=True) as conn, conn.begin():
        text = conn.execute(_STORED, {"bank_id": bank_id, "day": day}).scalar()
    return ReconSummary.from_json(text, replayed=True) if text else None


def stored_lines(router: BranchRouter, bank_id: str, day: dt.date) -> Iterator[list[Discrepancy]]:
    for engine in router.engines():
        yield from recon.stored_lines(engine, bank_id, day)


def day_summary(router: BranchRouter, bank_id: str, day: dt.date) -> ReconSummary | None:
    """The day's stored result in either topology: the front's sum, or the one database's."""
    return stored_summary(router, bank_id, day) if router.split else recon.stored_summary(router.primary, bank_id, day)


def day_lines(router: BranchRouter, bank_id: str, day: dt.date) -> Iterator[list[Discrepancy]]:
    """The day's discrepancy lines in either topology (branch by branch, the primary first)."""
    if router.split:
        return stored_lines(router, bank_id, day)
    return recon.stored_lines(router.primary, bank_id, day)


def summed(bank_id: str, day: dt.date, parts: Sequence[ReconSummary], now: dt.datetime) -> ReconSummary:
    totals = tuple(OutcomeTotal(o, sum(p.total(o).count for p in parts), sum(p.total(o).amount_fen for p in parts))
                   for o in recon.OUTCOMES)
    return ReconSummary(bank_id, day, totals, sum(p.net_settlement_fen for p in parts),
                        sum(p.record_count for p in parts), now, refund_count=sum(p.refund_count for p in parts),
                        refund_fen=sum(p.refund_fen for p in parts))


class BranchReconciliation:
    """The same interface as recon.Reconciliation (load, check_trailer,
    close_day, record_count), over every branch database of the router."""

    def __init__(self, router: BranchRouter, bank_id: str, day: dt.date, *, rates: LateFeeRates,
                 now: dt.datetime) -> None:
        self.router = router
        self.front = _front(router)
        self.bank_id = bank_id
        self.day = day
        self.now = now
        self.record_count = 0
        self.total_fen = 0
        self._engines = router.engines()
        self._runs = [Reconciliation(e, bank_id, day, rates=rates, now=now) for e in self._engines]
        self._stack = ExitStack()
        # serial -> (index of its branch run, account, amount, status) for serials the registry does not know
        self._unclaimed: dict[str, tuple[int, str, int, str]] = {}

    def __enter__(self) -> BranchReconciliation:
        try:
            for run in self._runs:
                self._stack.enter_context(run)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()  # rolls back whatever is still open

    # -- loading --
    def load(self, records: Sequence[StagedRecord], where: str = "records") -> None:
        if len(records) > recon.RECORDS_PER_BATCH_MAX:
            raise InvalidField("batch.records", f"at most {recon.RECORDS_PER_BATCH_MAX} records per batch")
        if self.record_count + len(records) > recon.RECORDS_PER_DAY_MAX:
            raise InvalidField("batch.records", f"at most {recon.RECORDS_PER_DAY_MAX} records per day")
        claims = registry.lookup_many(self.front, self.bank_id, sorted({r[1] for r in records}))
        parts: list[list[StagedRecord]] = [[] for _ in self._runs]
        for rec in records:
            parts[self._route(rec, claims.get(rec[1]))].append(rec)
        for run, part in zip(self._runs, parts, strict=True):
            if part:
                run.load(part, where)
        self.record_count += len(records)
        self.total_fen += sum(r[3] for r in records)

    def _route(self, rec: StagedRecord, claim: Claim | None) -> int:
        if claim is not None:
            return self._index(self.router.engine_for_branch(claim.home))
        serial, account, amount, status = rec[1], rec[2], rec[3], rec[4]
        first = self._unclaimed.get(serial)
        if first is not None:
            return first[0]  # a repeated serial: its branch's staging names both lines
        if len(self._unclaimed) >= UNCLAIMED_SERIALS_MAX:
            raise InvalidField("batch.records", f"more than {UNCLAIMED_SERIALS_MAX} records of serials the MIS "
                               "does not know; split the day or check the file")
        i = self._index(self.router.engine_for(account))
        self._unclaimed[serial] = (i, account, amount, status)
        return i

    def _index(self, engine: Engine) -> int:
        return self._engines.index(engine)

    def check_trailer(self, record_count: int, total_fen: int, field: str = "trailer") -> None:
        if record_count != self.record_count:
            raise InvalidField(f"{field}.record_count", f"says {record_count} records, {self.record_count} were sent")
        if total_fen != self.total_fen:
            raise InvalidField(f"{field}.total_fen", f"says {total_fen} fen, the records add up to {self.total_fen}")

    # -- closing the day everywhere --
    def close_day(self, where: str = "records", confirm: Callable[[], None] = recon.nothing_to_confirm
                  ) -> ReconSummary:
        stored = stored_summary(self.router, self.bank_id, self.day)
        if stored is not None:
            return stored
        claimed = self._claim_bank_only()
        parts = [run.prepare_close(where) for run in self._runs]  # any failure: every branch rolls back
        confirm()  # the bank's stream still wants them (recon.Reconciliation.close_day)
        for run in self._runs:
            run.commit()
        for serial in claimed:
            registry.settle(self.front, self.bank_id, serial, self.now)
        return self._record(summed(self.bank_id, self.day, parts, self.now))

    def _claim_bank_only(self) -> list[str]:
        """Claims, in its account's branch, every serial the bank posted that the registry
        did not know: a BANK_ONLY that reconciliation will post there."""
        claimed = []
        for serial, (i, account, amount, status) in self._unclaimed.items():
            if status != recon.BANK_POSTED:
                continue
            want = Claim(self.bank_id, serial, registry.PAY, account[:2], account, amount, registry.CLAIMED)
            claim, fresh = registry.claim(self.front, want, self.now)
            if fresh:
                claimed.append(serial)
            elif self._index(self.router.engine_for_branch(claim.home)) != i:
                raise Unavailable(f"serial {serial} reached the MIS while the day was being reconciled; "
                                  "reconcile again", reason="RECON_RETRY")
        return claimed

    def _record(self, summary: ReconSummary) -> ReconSummary:
        try:
            with self.front.begin() as conn:
                conn.execute(T_DAY.insert(), {"bank_id": self.bank_id, "settlement_date": self.day,
                                              "reconciled_at": self.now, "summary_json": summary.to_json()})
        except IntegrityError:
            stored = stored_summary(self.router, self.bank_id, self.day)
            if stored is None:
                raise
            return stored
        return summary


def reconciliation(router: BranchRouter, bank_id: str, day: dt.date, *, rates: LateFeeRates,
                   now: dt.datetime) -> Any:
    """A Reconciliation for one database, or a BranchReconciliation across the router's branches."""
    if router.split:
        return BranchReconciliation(router, bank_id, day, rates=rates, now=now)
    return Reconciliation(router.primary, bank_id, day, rates=rates, now=now)
