"""Acceptance (issue 5): the load test's correctness check can fail.

Real processes on loopback: mis_adapter over a seeded SQLite MIS, the bridge
with its SQLite journal, and `python -m bank_sim load` sending a short mix of
queries, pays, cancels and auto-debits through the bridge. On the untouched
run the check passes (exit 0). Then one accepted payment is made to disappear
from the MIS and another is altered: re-checking the saved ledger exits
non-zero and names both, and the sums no longer agree."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from bank_sim.load import ACCEPTED, CANCEL_NONE, CANCEL_REVERSED, RunLedger
from mis_adapter.db.core import AllocationRow, Payment, PrepaidEntry
from tests.support.databases import migrated_sqlite
from tests.support.procs import REPO, Proc, start
from yindian_common.db import make_engine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

BANK = "ICBC"
ACCOUNTS = 200
COMMAND_TIMEOUT_S = 120


def python_m(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, check=False)


def test_check_passes_on_the_untouched_run_and_fails_when_a_payment_disappears(tmp_path: Path) -> None:
    mis_db, bridge_db = migrated_sqlite(tmp_path / "mis.db"), migrated_sqlite(tmp_path / "bridge.db", "bridge")
    seeded = python_m("mis_adapter", "seed", "--db", mis_db, "--accounts", str(ACCOUNTS),
                      "--roster-dir", str(tmp_path / "rosters"))
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    procs: list[Proc] = []
    try:
        adapter = start("mis_adapter", ["mis_adapter", "serve", "--db", mis_db, "--listen", "127.0.0.1:0",
                                        "--metrics-port", "0", "--insecure"], log_dir=tmp_path)
        procs.append(adapter)
        bridge = start("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", adapter.grpc_addr,
                                  "--db", bridge_db, "--bank-id", BANK, "--metrics-port", "0", "--insecure"],
                       log_dir=tmp_path)
        procs.append(bridge)
        ledger_path, json_path = tmp_path / "ledger.jsonl", tmp_path / "result.json"
        run = python_m("bank_sim", "load", "--target", bridge.grpc_addr, "--bank-id", BANK,
                       "--roster", str(tmp_path / "rosters" / f"{BANK}.csv"), "--rate", "60", "--duration", "2",
                       "--warmup", "0.5", "--concurrency", "32", "--mix", "query=2,pay=4,cancel=2,autodebit=2",
                       "--insecure", "--no-progress", "--mis-db", mis_db, "--save-ledger", str(ledger_path),
                       "--json", str(json_path))
        assert run.returncode == 0, run.stdout + run.stderr
        assert "check (mis-db): OK" in run.stdout
        result = json.loads(json_path.read_text(encoding="utf-8"))
        check = result["check"]
        assert check["ok"] and check["accepted"] > 0 and check["cancelled"] > 0
        assert check["mis_posted_fen"] == check["accepted_fen"] - check["cancelled_fen"]

        ledger = RunLedger.load(ledger_path)
        posted = [s for s, r in ledger.pays.items() if r.outcome == ACCEPTED and r.cancel == CANCEL_NONE]
        assert any(r.cancel == CANCEL_REVERSED for r in ledger.pays.values())
        vanished, altered = posted[0], posted[1]
        engine = make_engine(mis_db)
        try:
            with engine.begin() as conn:
                p = Payment.__table__.c
                pid = conn.execute(sa.select(p.payment_id).where(p.bank_id == BANK, p.bank_serial == vanished)
                                   ).scalar_one()
                conn.execute(sa.delete(AllocationRow.__table__).where(AllocationRow.__table__.c.payment_id == pid))
                conn.execute(sa.delete(PrepaidEntry.__table__).where(PrepaidEntry.__table__.c.payment_id == pid))
                conn.execute(sa.delete(Payment.__table__).where(p.payment_id == pid))
                conn.execute(sa.update(Payment.__table__).where(p.bank_id == BANK, p.bank_serial == altered)
                             .values(amount_fen=p.amount_fen - 1))
        finally:
            engine.dispose()

        recheck = python_m("bank_sim", "load", "--check-ledger", str(ledger_path), "--mis-db", mis_db,
                           "--bank-id", BANK)
        assert recheck.returncode == 1, recheck.stdout + recheck.stderr
        assert "check (mis-db): FAILED: 3 discrepancies" in recheck.stdout
        assert f"DISCREPANCY MISSING serial={vanished}" in recheck.stdout
        assert f"DISCREPANCY WRONG_AMOUNT serial={altered}" in recheck.stdout
        off_by = ledger.pays[vanished].amount_fen + 1
        assert "DISCREPANCY SUM_MISMATCH serial=* " in recheck.stdout and f"(off by -{off_by})" in recheck.stdout
    finally:
        for proc in reversed(procs):
            proc.terminate()
