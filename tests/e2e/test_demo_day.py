"""`make run` end to end: `python -m bank_sim demo-day` with small sizes, as a
real process that itself starts mis_adapter and the bridge. It must exit 0
after stopping everything, and the money its summary reports must be what
the utility's database holds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.procs import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_demo_day_summary_agrees_with_the_utility(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    summary_path = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, "-m", "bank_sim", "demo-day", "--work-dir", str(work),
                           "--accounts", "400", "--customers", "60", "--cancel-ratio", "0.2",
                           "--summary-json", str(summary_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Latency per attempt, ms" in done.stdout and "net posted" in done.stdout
    facts = json.loads(summary_path.read_text(encoding="utf-8"))
    assert facts["ok"] is True
    assert facts["exit_codes"] == {"bridge": 0, "mis_adapter": 0, "portal": 0}
    assert facts["portal_url"].startswith("http://127.0.0.1:") and facts["portal_url"] in done.stdout
    day = facts["teller"]
    assert day["customers"].get("paid", 0) > 0 and day["customers"].get("cancelled", 0) > 0
    assert sum(day["customers"].values()) <= 60
    assert day["passbooks_broken"] == 0 and "PENDING" not in day["ledger"]

    mis = sa.create_engine(f"sqlite:///{work / 'mis.db'}")
    with mis.connect() as conn:
        # the counters' serials only: later steps of the day (auto-debit) add payments of their own
        rows = conn.execute(sa.text("SELECT state, COUNT(*), COALESCE(SUM(amount_fen), 0) FROM payments "
                                    "WHERE bank_id = 'ICBC' AND bank_serial LIKE :p GROUP BY state"),
                            {"p": day["serial_prefix"] + "%"}).all()
    mis.dispose()
    by_state = {state: (int(n), int(fen)) for state, n, fen in rows}
    assert by_state.get("POSTED") == (day["ledger"]["POSTED"]["count"], day["net_posted_fen"])
    assert by_state.get("REVERSED") == (day["ledger"]["CANCELLED"]["count"], day["cancelled_fen"])
    assert set(by_state) <= {"POSTED", "REVERSED"}

    # The day ends with a voice dunning campaign (recording dialer): what it reports is what the MIS holds.
    dunning = facts["dunning"]
    assert dunning["calls"] > 0 and dunning["outcomes"]["SKIPPED_OPT_OUT"] == 2
    assert "Voice dunning campaign" in done.stdout and "arrears reached" in done.stdout
    with mis.connect() as conn:
        recorded = dict(conn.execute(sa.text("SELECT outcome, COUNT(*) FROM dunning_attempts WHERE campaign_id = :c "
                                             "GROUP BY outcome"), {"c": dunning["campaign_id"]}).all())
    mis.dispose()
    assert recorded == dunning["outcomes"]
    assert sum(n for o, n in recorded.items() if not o.startswith("SKIPPED")) == dunning["calls"]
