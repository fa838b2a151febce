"""`make run` end to end: `python -m bank_sim demo-day` with small sizes, as a
real process that itself starts mis_adapter and the bridge. It must exit 0
after stopping everything, and the money its summary reports must be what
the utility's database holds. With --branch-topology (front database,
branch databases 02 and 03, two mis_adapter replicas) it says so in its
summary and the money is what the three MIS databases hold together."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.procs import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def mis_rows(work: Path, branches: bool, sql: str, params: dict[str, object]) -> dict[str, tuple[int, int]]:
    """(key -> (count, sum)) of `sql` over every MIS database of the day, added up."""
    out: dict[str, tuple[int, int]] = {}
    for name in ["mis.db", *(["mis-02.db", "mis-03.db"] if branches else [])]:
        eng = sa.create_engine(f"sqlite:///{work / name}")
        with eng.connect() as conn:
            for key, n, total in conn.execute(sa.text(sql), params).all():
                was = out.get(key, (0, 0))
                out[key] = (was[0] + int(n), was[1] + int(total))
        eng.dispose()
    return out


@pytest.mark.parametrize("branches", [False, True], ids=["one-database", "branch-topology"])
def test_demo_day_summary_agrees_with_the_utility(tmp_path: Path, branches: bool) -> None:
    work = tmp_path / "demo"
    summary_path = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, "-m", "bank_sim", "demo-day", "--work-dir", str(work),
                           "--accounts", "400", "--customers", "60", "--cancel-ratio", "0.2",
                           "--summary-json", str(summary_path), *(["--branch-topology"] if branches else [])],
                          cwd=REPO, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Latency per attempt, ms" in done.stdout and "net posted" in done.stdout
    facts = json.loads(summary_path.read_text(encoding="utf-8"))
    assert facts["ok"] is True
    replicas = {"mis_adapter-b": 0} if branches else {}
    assert facts["exit_codes"] == {"bridge": 0, "mis_adapter": 0, "portal": 0, **replicas}
    assert ("Topology: branch topology: front database" in done.stdout) is branches
    if branches:  # the accounts of branches 02 and 03 live in their own databases, and were paid there too
        assert all((work / f"mis-{code}.db").exists() for code in ("02", "03"))
    assert facts["portal_url"].startswith("http://127.0.0.1:") and facts["portal_url"] in done.stdout
    day = facts["teller"]
    assert day["customers"].get("paid", 0) > 0 and day["customers"].get("cancelled", 0) > 0
    assert sum(day["customers"].values()) <= 60
    assert day["passbooks_broken"] == 0 and "PENDING" not in day["ledger"]

    # the counters' serials only: later steps of the day (auto-debit) add payments of their own
    by_state = mis_rows(work, branches, "SELECT state, COUNT(*), COALESCE(SUM(amount_fen), 0) FROM payments "
                        "WHERE bank_id = 'ICBC' AND bank_serial LIKE :p GROUP BY state",
                        {"p": day["serial_prefix"] + "%"})
    assert by_state.get("POSTED") == (day["ledger"]["POSTED"]["count"], day["net_posted_fen"])
    assert by_state.get("REVERSED") == (day["ledger"]["CANCELLED"]["count"], day["cancelled_fen"])
    assert set(by_state) <= {"POSTED", "REVERSED"}
    if branches:  # some of the counters' customers belong to branches 02 and 03: paid in their databases
        in_branches = sum(n for n, _ in by_state.values()) - sum(
            n for n, _ in mis_rows(work, False, "SELECT state, COUNT(*), 0 FROM payments WHERE bank_serial LIKE :p "
                                   "GROUP BY state", {"p": day["serial_prefix"] + "%"}).values())
        assert in_branches > 0

    # The day ends with a voice dunning campaign (recording dialer): what it reports is what the MIS holds.
    dunning = facts["dunning"]
    assert dunning["calls"] > 0 and dunning["outcomes"]["SKIPPED_OPT_OUT"] == 2
    assert "Voice dunning campaign" in done.stdout and "arrears reached" in done.stdout
    recorded = {o: n for o, (n, _) in mis_rows(work, branches, "SELECT outcome, COUNT(*), 0 FROM dunning_attempts "
                                                "WHERE campaign_id = :c GROUP BY outcome",
                                                {"c": dunning["campaign_id"]}).items()}
    assert recorded == dunning["outcomes"]
    assert sum(n for o, n in recorded.items() if not o.startswith("SKIPPED")) == dunning["calls"]
