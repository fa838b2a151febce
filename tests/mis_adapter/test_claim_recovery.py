"""Registry claims nobody will settle (issue 10): a Pay killed between its
front claim and its branch commit, or after the branch commit. The recovery
pass (the operator's `python -m mis_adapter registry recover`; `serve` runs
the same at start and periodically) looks in each claim's branch: posted →
settled; nothing there and older than registry_claim_expiry_s → released,
so the serial is free again; a young claim (its Pay may be in flight) stays.
Three branch databases, on SQLite, PostgreSQL and MariaDB (the claim times
come back with and without a zone)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa

from mis_adapter import claim_recovery, payments, registry
from mis_adapter.context import AdapterContext
from mis_adapter.db.front import FrontSerial
from mis_adapter.migrate import upgrade
from mis_adapter.payments import PayCommand
from mis_adapter.registry import Claim
from mis_adapter.settings import AdapterSettings
from tests.support.mis_data import BillSpec, add_account, add_bank
from tests.support.topology import BRANCHES3, Topology, topology_databases
from yindian_common.clock import ManualClock, utc_now
from yindian_common.errors import SerialConflict, SerialReversed

pytestmark = pytest.mark.timeout(120)

BANK = "ICBC"
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
BILL = [BillSpec("202610", 10_000, dt.date(2026, 11, 25))]
FEN = 10_100


def states(ctx: AdapterContext) -> dict[str, str]:
    t = FrontSerial.__table__
    assert ctx.router.front is not None
    with ctx.router.front.connect() as conn:
        return {r.serial: r.state for r in conn.execute(sa.select(t.c.serial, t.c.state))}


def cli(topo: Topology, *extra: str, at: dt.datetime = NOW) -> list[str]:
    return ["recover", *topo.cli_flags(), *extra, "--clock-start", at.isoformat()]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_recovery_settles_posted_releases_expired_and_keeps_young_claims(
        backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with topology_databases(backend, BRANCHES3, tmp_path, schema="mis") as topo:
        clock = ManualClock(NOW)
        ctx = AdapterContext.build(AdapterSettings(db=topo.db, branch_db=topo.branch_db), clock)
        try:
            for e in ctx.router.all_engines():
                upgrade(e)
            add_bank(ctx.router.primary, BANK)
            a01, a02, a03 = (add_account(ctx.router.engine_for_branch(c), c, 1, BILL) for c in ("01", "02", "03"))
            hour_ago = utc_now(clock) - dt.timedelta(hours=1)

            def left_open(serial: str, account: str, at: dt.datetime) -> None:
                """What a Pay killed right after its claim leaves: the claim, nothing in the branch."""
                registry.claim(ctx.router.front, Claim(BANK, serial, registry.PAY, account[:2], account, FEN,  # type: ignore[arg-type]
                                                       registry.CLAIMED), at)

            left_open("DEAD-BEFORE-COMMIT", a02, hour_ago)
            left_open("DEAD-AFTER-COMMIT", a03, hour_ago)
            # ... killed after its branch commit: the payment is in branch 03, the claim still open
            payments.pay_in(ctx, ctx.router.engine_for(a03), PayCommand(BANK, "DEAD-AFTER-COMMIT", a03, FEN))
            left_open("IN-FLIGHT", a02, utc_now(clock) - dt.timedelta(seconds=30))
            # the stale claim holds the serial: another account's pay of it is refused, though nothing was posted
            with pytest.raises(SerialConflict):
                payments.pay(ctx, PayCommand(BANK, "DEAD-BEFORE-COMMIT", a01, FEN))
            assert payments.get_payment(ctx, BANK, "DEAD-BEFORE-COMMIT").state == "NOT_FOUND"

            assert claim_recovery.main(cli(topo)) == 0
            assert "settled=1 released=1 open=1" in capsys.readouterr().out
            assert states(ctx) == {"DEAD-AFTER-COMMIT": "SETTLED", "IN-FLIGHT": "CLAIMED"}
            # released: the serial is free again, the bank's next use of it posts once
            assert payments.pay(ctx, PayCommand(BANK, "DEAD-BEFORE-COMMIT", a01, FEN)).account_no == a01
            assert payments.get_payment(ctx, BANK, "DEAD-AFTER-COMMIT").state == "POSTED"
            # a second pass changes nothing; once the young claim outlives the expiry it is released too
            assert claim_recovery.main(cli(topo)) == 0
            assert "settled=0 released=0 open=1" in capsys.readouterr().out
            assert claim_recovery.main(cli(topo, "--claim-expiry-s", "60", at=NOW + dt.timedelta(seconds=31))) == 0
            assert "settled=0 released=1 open=0" in capsys.readouterr().out
            assert states(ctx) == {"DEAD-AFTER-COMMIT": "SETTLED", "DEAD-BEFORE-COMMIT": "SETTLED"}
        finally:
            ctx.router.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_backfill_after_a_split_makes_old_serials_one_payment_across_branches(
        backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three databases that ran on their own before the split (each its own serial check), then
    `registry backfill`: a serial posted before the split cannot post again on another branch, its
    reversal and tombstone hold, GetPayment finds it; a serial two databases hold is reported."""
    with topology_databases(backend, BRANCHES3, tmp_path, schema="mis") as topo:
        urls = [topo.db, *(spec.split("=", 1)[1] for spec in topo.branch_db)]
        clock = ManualClock(NOW)
        alone = [AdapterContext.build(AdapterSettings(db=u), clock) for u in urls]
        split = AdapterContext.build(AdapterSettings(db=topo.db, branch_db=topo.branch_db), clock)
        try:
            for c in alone:
                upgrade(c.router.primary)
                add_bank(c.router.primary, BANK)
            a01, a02, a03 = (add_account(c.router.primary, code, 1, BILL) for c, code in zip(alone, ("01", "02", "03"),
                                                                                               strict=True))
            payments.pay(alone[1], PayCommand(BANK, "OLD-02", a02, FEN))
            payments.pay(alone[2], PayCommand(BANK, "OLD-03", a03, 500))
            payments.cancel(alone[2], payments.CancelCommand(BANK, "C-OLD-03", "OLD-03", 500))
            payments.cancel(alone[0], payments.CancelCommand(BANK, "C-NEVER", "NEVER-ARRIVED", 700))  # tombstone
            payments.pay(alone[1], PayCommand(BANK, "DUP-1", a02, 100))  # the same serial in two databases
            payments.pay(alone[2], PayCommand(BANK, "DUP-1", a03, 100))

            assert claim_recovery.main(["backfill", *topo.cli_flags()]) == 1
            out = capsys.readouterr().out
            assert "serials=5 cancels=2 conflicts=1" in out
            assert "serial DUP-1: PAY in database 03, the registry says PAY in 02" in out
            # the bank reusing a pre-split serial on another branch's account: refused, nothing posted
            with pytest.raises(SerialConflict):
                payments.pay(split, PayCommand(BANK, "OLD-02", a01, FEN))
            got = payments.get_payment(split, BANK, "OLD-02")
            assert got.state == "POSTED" and got.payment is not None and got.payment.account_no == a02
            assert payments.get_payment(split, BANK, "OLD-03").state == "REVERSED"
            # the bank's retry of the pre-split cancel is answered from branch 03's stored cancel
            assert payments.cancel(split, payments.CancelCommand(BANK, "C-OLD-03", "OLD-03", 500)).outcome == "REVERSED"
            with pytest.raises(SerialConflict):
                payments.cancel(split, payments.CancelCommand(BANK, "C-OLD-03", "OLD-02", FEN))
            with pytest.raises(SerialReversed):  # cancelled before it arrived, before the split
                payments.pay(split, PayCommand(BANK, "NEVER-ARRIVED", a03, 700))
            # a rerun writes nothing new and reports the same
            assert claim_recovery.main(["backfill", *topo.cli_flags()]) == 1
            assert "serials=5 cancels=2 conflicts=1" in capsys.readouterr().out
        finally:
            for c in (*alone, split):
                c.router.dispose()
