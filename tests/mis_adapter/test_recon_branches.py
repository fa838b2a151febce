"""Reconciliation scenarios only the branch topology has (issue 10): a branch
failing while the day closes leaves the day open everywhere, and the rerun
finishes it; the wire stream sums the branches. The whole single-database
suite (test_recon.py, its every-outcome day included) also runs on three
branch databases."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from mis_adapter import payments, recon, recon_branches
from mis_adapter.context import AdapterContext
from mis_adapter.payments import CancelCommand, PayCommand
from mis_adapter.seed import seed
from mis_adapter.settings import AdapterSettings
from tests.support.databases import fresh_database
from tests.support.mis_data import BillSpec, add_account, running_adapter
from yindian.v1 import billing_pb2 as pb
from yindian_common.clock import ManualClock, business_date
from yindian_common.fields import make_account_no

pytestmark = [pytest.mark.timeout(180), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema

TZ8 = dt.timezone(dt.timedelta(hours=8))
DAY_START = dt.datetime(2026, 11, 28, 10, 0, tzinfo=TZ8)
BANK = "ICBC"


@dataclass
class World:
    ctx: AdapterContext
    clock: ManualClock
    engines: list[sa.Engine]
    accounts: list[str]  # accounts with unpaid bills, most owing first, over every branch


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with ExitStack() as stack:
        main, b02, b03 = (stack.enter_context(fresh_database(request.param, tmp_path, label, schema="mis"))
                          for label in ("main", "b02", "b03"))
        clock = ManualClock(DAY_START)
        ctx = AdapterContext.build(AdapterSettings(db=main, branch_db=[f"02={b02}", f"03={b03}"],
                                                   sqlite_synchronous="NORMAL"), clock)
        stack.callback(ctx.router.dispose)
        seed(ctx.router, 240, tmp_path / "rosters", today=business_date(clock), now=clock.now(), arrears_share=0.6)
        per_db: list[list[str]] = []
        for e in ctx.router.engines():
            with e.connect() as conn:
                per_db.append([r[0] for r in conn.execute(sa.text(
                    "SELECT account_no FROM bills WHERE status <> 'PAID' GROUP BY account_no "
                    "ORDER BY SUM(amount_fen) DESC, account_no"))])
        # most owing first in each database, taken in turn: the scenario's accounts span the branches
        accounts = [acct for row in zip(*per_db, strict=False) for acct in row]
        assert len(accounts) >= 20 and {a[:2] for a in accounts[:3]} >= {"02", "03"}
        yield World(ctx, clock, ctx.router.engines(), accounts)


def pay(w: World, serial: str, account: str, amount: int, bank: str = BANK) -> payments.PayResult:
    return payments.pay(w.ctx, PayCommand(bank, serial, account, amount))


def cancel(w: World, serial: str, original: str, amount: int) -> payments.CancelResult:
    return payments.cancel(w.ctx, CancelCommand(BANK, serial, original, amount))


def run(w: World, records: list[tuple[str, str, int, str]], batch: int = 3) -> recon.ReconSummary:
    staged = [(i + 1, *r) for i, r in enumerate(records)]
    with recon_branches.reconciliation(w.ctx.router, BANK, business_date(w.clock), rates=w.ctx.rates,
                                       now=w.clock.now()) as r:
        for start in range(0, len(staged), batch):
            r.load(staged[start:start + batch])
        r.check_trailer(len(records), sum(rec[2] for rec in records))
        return r.close_day()  # type: ignore[no-any-return]


def lines(w: World) -> dict[str, recon.Discrepancy]:
    return {d.bank_serial: d for page in recon_branches.stored_lines(w.ctx.router, BANK, business_date(w.clock))
            for d in page}


def mis_payments(w: World) -> dict[str, tuple[int, str, str, int]]:
    """serial -> (database index, state, account, amount) over every branch database."""
    out = {}
    for i, e in enumerate(w.engines):
        with e.connect() as conn:
            for r in conn.execute(sa.text("SELECT bank_serial, state, account_no, amount_fen FROM payments "
                                          "WHERE bank_id = 'ICBC'")):
                assert r[0] not in out, f"serial {r[0]} in two databases"
                out[r[0]] = (i, r[1], r[2] or "", r[3])
    return out


def closed_in(w: World) -> list[int]:
    found = []
    for i, e in enumerate(w.engines):
        with e.connect() as conn:
            if conn.execute(sa.text("SELECT COUNT(*) FROM reconciled_days")).scalar_one():
                found.append(i)
    return found


def every_outcome_day(w: World) -> list[tuple[str, str, int, str]]:
    """test_recon's every-outcome day over three databases; returns the bank's records."""
    a = w.accounts
    w.clock.set(DAY_START - dt.timedelta(days=1))
    pay(w, "Y-1", a[0], 500)
    w.clock.set(DAY_START)
    pay(w, "M-1", a[0], 1_000)
    pay(w, "M-2", a[1], 2_000)
    pay(w, "PAIR", a[2], 300)
    cancel(w, "C-PAIR", "PAIR", 300)
    pay(w, "U-1", a[3], 700)
    pay(w, "U-2", a[4], 999_999)
    pay(w, "X-AMT", a[5], 1_000)
    pay(w, "X-ACC", a[6], 1_000)
    pay(w, "X-REV", a[7], 400)
    cancel(w, "C-REV", "X-REV", 400)
    cancel(w, "C-TOMB", "X-TOMB", 800)
    pay(w, "M-1", a[0], 1_000, bank="ABC")
    x_acc_elsewhere = next(x for x in a[9:] if x[:2] != a[6][:2])  # the bank's account is in another branch
    return [
        ("M-1", a[0], 1_000, "POSTED"),
        ("M-2", a[1], 2_000, "POSTED"),
        ("PAIR", a[2], 300, "CANCELLED"),
        ("U-2", a[4], 999_999, "CANCELLED"),
        ("B-1", a[8], 1_500, "POSTED"),
        ("B-GONE", a[9], 200, "CANCELLED"),
        ("X-AMT", a[5], 1_200, "POSTED"),
        ("X-ACC", x_acc_elsewhere, 1_000, "POSTED"),
        ("X-REV", a[7], 400, "POSTED"),
        ("X-TOMB", a[10], 800, "POSTED"),
        ("Y-1", a[0], 500, "POSTED"),
        ("B-NOACCT", make_account_no("09", 9_999_999), 600, "POSTED"),
    ]


def test_a_branch_failing_leaves_the_day_open_everywhere_and_the_rerun_finishes(world: World) -> None:
    w = world
    records = every_outcome_day(w)
    last = w.engines[-1]
    failed = []

    def lose_branch(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not failed and statement.lstrip().upper().startswith("INSERT INTO RECONCILED_DAYS"):
            failed.append(statement)
            raise RuntimeError("branch 03 lost while closing the day")

    event.listen(last, "before_cursor_execute", lose_branch)
    with pytest.raises(RuntimeError):
        run(w, records)
    assert failed and closed_in(w) == []
    assert recon_branches.stored_summary(w.ctx.router, BANK, business_date(w.clock)) is None
    pays = mis_payments(w)
    assert pays["U-1"][1] == "POSTED" and "B-1" not in pays  # nothing applied anywhere
    # the day is still open in the other branches: a cancel of M-2 goes through, then the rerun closes it
    assert cancel(w, "C-M2", "M-2", 2_000).outcome == "REVERSED"
    summary = run(w, records)
    assert closed_in(w) == [0, 1, 2] and not summary.replayed
    got = {t.outcome: (t.count, t.amount_fen) for t in summary.totals}
    assert got[recon.UTILITY_ONLY] == (2, 999_999 + 700) and got[recon.BANK_ONLY] == (1, 1_500)
    assert got[recon.MISMATCH][0] == 7  # M-2 is now reversed in the MIS but posted at the bank
    assert lines(w)["M-2"].detail == recon.DETAIL_REVERSED


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_reconcile_stream_sums_the_branches(backend: str, tmp_path: Path) -> None:
    bill = [BillSpec("202610", 10_000, dt.date(2026, 11, 25))]
    with ExitStack() as stack:
        main, b02, b03 = (stack.enter_context(fresh_database(backend, tmp_path, label, schema="mis"))
                          for label in ("main", "b02", "b03"))
        a = stack.enter_context(running_adapter(main, branch_db=[f"02={b02}", f"03={b03}"]))
        accts = [add_account(a.ctx.router.engine_for_branch(c), c, 1, bill) for c in ("01", "02", "03")]
        for i, acct in enumerate(accts):
            a.stub.Pay(pb.PayRequest(bank_serial=f"R-{i}", account_no=acct, amount_fen=10_100,
                                     channel=pb.CHANNEL_COUNTER), metadata=a.md())
        recs = [pb.BankRecord(bank_serial=f"R-{i}", account_no=acct, amount_fen=10_100,
                              status=pb.BANK_RECORD_STATUS_POSTED) for i, acct in enumerate(accts[:2])]
        recs.append(pb.BankRecord(bank_serial="R-NEW", account_no=accts[2], amount_fen=500,
                                  status=pb.BANK_RECORD_STATUS_POSTED))
        msgs = [pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date="2026-11-28")),
                pb.ReconcileRequest(batch=pb.BankRecordBatch(records=recs))]
        out = list(a.stub.Reconcile(iter(msgs), metadata=a.md(), timeout=60))
        summary = out[-1].summary
        totals = {t.outcome: (t.count, t.amount_fen) for t in summary.totals}
        assert totals[pb.RECONCILE_OUTCOME_MATCHED] == (2, 20_200)
        assert totals[pb.RECONCILE_OUTCOME_BANK_ONLY] == (1, 500)
        assert totals[pb.RECONCILE_OUTCOME_UTILITY_ONLY] == (1, 10_100)  # R-2, in branch 03, not sent
        assert summary.net_settlement_fen == 20_200 + 500 and summary.record_count == 3
        discrepancies = {d.bank_serial: d.outcome for m in out[:-1] for d in m.discrepancies.discrepancies}
        assert discrepancies == {"R-2": pb.RECONCILE_OUTCOME_UTILITY_ONLY, "R-NEW": pb.RECONCILE_OUTCOME_BANK_ONLY}
        replay = list(a.stub.Reconcile(iter(msgs[:1]), metadata=a.md(), timeout=60))
        assert replay[-1].summary.replayed and replay[-1].summary.net_settlement_fen == summary.net_settlement_fen
