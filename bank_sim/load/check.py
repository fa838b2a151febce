"""The run's ledger of pays and the correctness check: the ledger against the MIS's payment rows,
read over SQL (the check's own text SQL, read only) or over the wire (GetPayment)."""
from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bank_sim import mis_tables
from bank_sim.load.client import LoadClient
from bank_sim.load.profile import (
    ACCEPTED,
    ARRIVALS_MAX,
    CANCEL_IN_DOUBT,
    CANCEL_NONE,
    CANCEL_REVERSED,
    CHECK_FETCH_ROWS,
    DISCREPANCIES_KEPT_MAX,
    MIS_POSTED,
    MIS_REVERSED,
    MIS_TOMBSTONE,
    PENDING,
    REFUSED,
)
from yindian.v1 import billing_pb2
from yindian_common.db import make_engine

# ---- the run's ledger of pays ----

@dataclass(slots=True)
class PayRecord:
    account_no: str
    amount_fen: int
    channel: str
    outcome: str = PENDING
    code: str = ""
    cancel: str = CANCEL_NONE
    cancel_serial: str = ""


@dataclass
class RunLedger:
    """Every pay the run sent, by serial, with what the target answered."""

    prefix: str
    bank_id: str
    target: str
    pays: dict[str, PayRecord] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"prefix": self.prefix, "bank_id": self.bank_id, "target": self.target,
                                "pays": len(self.pays)}) + "\n")
            for serial, r in self.pays.items():
                f.write(json.dumps([serial, r.account_no, r.amount_fen, r.channel, r.outcome, r.code, r.cancel,
                                    r.cancel_serial]) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunLedger:
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
            ledger = cls(head["prefix"], head["bank_id"], head["target"])
            for n, line in enumerate(f, start=2):
                if n - 1 > ARRIVALS_MAX:
                    raise ValueError(f"{path}: more than {ARRIVALS_MAX} pays")
                serial, account_no, amount_fen, channel, outcome, code, cancel, cancel_serial = json.loads(line)
                ledger.pays[serial] = PayRecord(account_no, int(amount_fen), channel, outcome, code, cancel,
                                                cancel_serial)
        return ledger


# ---- the correctness check ----

@dataclass(frozen=True)
class Discrepancy:
    bank_serial: str
    kind: str
    detail: str


@dataclass(frozen=True)
class MisRow:
    state: str
    amount_fen: int
    account_no: str


@dataclass
class CheckResult:
    source: str
    pays_checked: int = 0
    accepted: int = 0
    accepted_fen: int = 0
    cancelled: int = 0
    cancelled_fen: int = 0
    mis_posted: int = 0
    mis_posted_fen: int = 0
    discrepancy_count: int = 0
    discrepancies: list[Discrepancy] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.discrepancy_count == 0

    def add(self, serial: str, kind: str, detail: str) -> None:
        self.discrepancy_count += 1
        if len(self.discrepancies) < DISCREPANCIES_KEPT_MAX:
            self.discrepancies.append(Discrepancy(serial, kind, detail))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def compare(ledger: RunLedger, mis: dict[str, list[MisRow]], source: str, *, mis_complete: bool) -> CheckResult:
    """The run's ledger against what the MIS holds for its serials. `mis_complete`: the view holds every
    row with the run's prefix (read from the database), so rows the run never sent are flagged too."""
    res = CheckResult(source)
    for serial, rec in ledger.pays.items():
        rows = mis.get(serial, [])
        posted = [r for r in rows if r.state == MIS_POSTED]
        res.pays_checked += 1
        res.mis_posted += len(posted)
        res.mis_posted_fen += sum(r.amount_fen for r in posted)
        if rec.outcome == ACCEPTED:
            _check_accepted(res, serial, rec, rows)
        elif rec.outcome == REFUSED:
            if posted:
                res.add(serial, "REFUSED_BUT_POSTED", f"the target answered {rec.code}, the MIS has it POSTED")
        else:
            res.add(serial, "PAY_IN_DOUBT", f"no definite answer for this pay (last {rec.code or 'none'})")
    if mis_complete:
        for serial, rows in mis.items():
            if serial not in ledger.pays and any(r.state == MIS_POSTED for r in rows):
                posted = [r for r in rows if r.state == MIS_POSTED]
                res.mis_posted += len(posted)
                res.mis_posted_fen += sum(r.amount_fen for r in posted)
                res.add(serial, "UNKNOWN_POSTED", "POSTED in the MIS under the run's prefix, never sent by the run")
    expected_fen = res.accepted_fen - res.cancelled_fen
    if expected_fen != res.mis_posted_fen:
        res.add("*", "SUM_MISMATCH", f"accepted {res.accepted_fen} - cancelled {res.cancelled_fen} = {expected_fen} "
                                     f"fen, MIS POSTED {res.mis_posted_fen} fen (off by "
                                     f"{res.mis_posted_fen - expected_fen})")
    return res


def _check_accepted(res: CheckResult, serial: str, rec: PayRecord, rows: list[MisRow]) -> None:
    res.accepted += 1
    res.accepted_fen += rec.amount_fen
    if rec.cancel == CANCEL_REVERSED:
        res.cancelled += 1
        res.cancelled_fen += rec.amount_fen
    if rec.cancel == CANCEL_IN_DOUBT:
        res.add(serial, "CANCEL_IN_DOUBT", f"no definite answer for cancel {rec.cancel_serial}")
    if not rows:
        res.add(serial, "MISSING", f"accepted {rec.amount_fen} fen on {rec.account_no}, not in the MIS")
        return
    if len(rows) > 1:
        res.add(serial, "DUPLICATE", f"{len(rows)} rows in the MIS")
        return
    row = rows[0]
    expected = MIS_REVERSED if rec.cancel == CANCEL_REVERSED else MIS_POSTED
    if rec.cancel != CANCEL_IN_DOUBT and row.state != expected:
        res.add(serial, "WRONG_STATE", f"expected {expected}, the MIS has {row.state}")
    if row.amount_fen != rec.amount_fen:
        res.add(serial, "WRONG_AMOUNT", f"accepted {rec.amount_fen} fen, the MIS has {row.amount_fen}")
    if row.account_no != rec.account_no:
        res.add(serial, "WRONG_ACCOUNT", f"accepted on {rec.account_no}, the MIS has {row.account_no}")


def read_mis(urls: Sequence[str], bank_id: str, prefix: str) -> dict[str, list[MisRow]]:
    """Every payment row of the bank under the run's prefix, over all branch databases (read only)."""
    p = mis_tables.payments.c  # declared by bank_sim: it imports nothing of mis_adapter
    stmt = (sa.select(p.bank_serial, p.state, p.amount_fen, p.account_no)
            .where(p.bank_id == bank_id, p.bank_serial.like(prefix + "%")))
    out: dict[str, list[MisRow]] = {}
    for url in urls:
        engine = make_engine(url, pool_size=1)
        try:
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True).execute(stmt)
                for part in result.partitions(CHECK_FETCH_ROWS):
                    for serial, state, amount_fen, account_no in part:
                        out.setdefault(serial, []).append(MisRow(state, int(amount_fen), account_no or ""))
        finally:
            engine.dispose()
    return out


_PB_STATES = {billing_pb2.PAYMENT_STATE_POSTED: MIS_POSTED, billing_pb2.PAYMENT_STATE_REVERSED: MIS_REVERSED,
              billing_pb2.PAYMENT_STATE_REFUSED: MIS_TOMBSTONE}


async def read_via_get_payment(client: LoadClient, ledger: RunLedger, concurrency: int, within_s: float
                               ) -> tuple[dict[str, list[MisRow]], list[Discrepancy]]:
    """GetPayment through the target for every pay of the ledger, within `within_s`."""
    out: dict[str, list[MisRow]] = {}
    failures: list[Discrepancy] = []
    asked: set[str] = set()
    until = asyncio.get_running_loop().time() + within_s

    async def one(serial: str, rec: PayRecord) -> None:
        asked.add(serial)
        code, resp = await client.call_until_definite(client.stub.GetPayment,
                                                      billing_pb2.GetPaymentRequest(bank_serial=serial), until)
        if code != "OK" or resp is None:
            failures.append(Discrepancy(serial, "UNCHECKED", f"GetPayment answered {code}"))
            return
        state = _PB_STATES.get(resp.state)
        if state is not None:
            amount = resp.payment.amount_fen if resp.HasField("payment") else rec.amount_fen
            account = resp.payment.account_no if resp.HasField("payment") else rec.account_no
            out[serial] = [MisRow(state, amount, account)]

    checkable = [(s, r) for s, r in ledger.pays.items() if r.outcome in (ACCEPTED, REFUSED)]
    await bounded_gather((functools.partial(one, s, r) for s, r in checkable), concurrency, until)
    failures += [Discrepancy(s, "UNCHECKED", f"not asked within {within_s:g} s") for s, _ in checkable
                 if s not in asked]
    return out, failures


async def bounded_gather(jobs: Iterable[Callable[[], Awaitable[None]]], concurrency: int, until: float) -> None:
    """Runs the jobs with at most `concurrency` at a time; none starts after `until` (loop time)."""
    it = iter(jobs)
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        for job in it:
            if loop.time() >= until:
                return
            await job()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
