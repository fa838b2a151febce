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
from yindian_common.errors import SerialConflict

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
    with topology_databases(backend, BRANCHES3, tmp_path) as topo:
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
