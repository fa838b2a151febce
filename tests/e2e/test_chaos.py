"""The seeded chaos soak (bank_sim chaos) with real processes: ≥ 10,000
operations and ≥ 50 faults (kill -9 of mis_adapter, the bridge and the
bank's auto-debit worker, link faults, short deadlines), with auto-debit
through the real bill feed, end with every invariant holding (exit 0), and
continuous reconciliation's gauge stays 0 on both servers through the
faults; the same seed gives the same schedule; a row changed behind the
system's back is flagged by continuous reconciliation on both servers
within a minute (the log naming its serial) and caught by the end-of-day
checks (exit 1). CHAOS_OPS / CHAOS_FAULTS change the size of the soak.

Where a PostgreSQL server is reachable (always in CI) the soak puts the MIS
there behind a second fault proxy, so its faults also terminate
mis_adapter's database connections and blackhole the database; on a machine
with nothing but Python it runs on SQLite without those two kinds."""
from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bank_sim.chaos import FAULT_KINDS, make_schedule, schedule_digest
from bank_sim.chaos_feed import feed_period
from mis_adapter.seed import periods_before
from tests.support.databases import IN_CI, admin_url, reachable_admin_url
from tests.support.procs import REPO

OPS = int(os.environ.get("CHAOS_OPS", "10000"))
FAULTS = int(os.environ.get("CHAOS_FAULTS", "60"))


def chaos(tmp_path: Path, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bank_sim", "chaos", "--work-dir", str(tmp_path / "chaos"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


def test_the_same_seed_gives_the_same_schedule() -> None:
    ops_a, faults_a = make_schedule(42, 10_000, 60)
    ops_b, faults_b = make_schedule(42, 10_000, 60)
    assert schedule_digest(ops_a, faults_a) == schedule_digest(ops_b, faults_b)
    assert schedule_digest(*make_schedule(43, 10_000, 60)) != schedule_digest(ops_a, faults_a)
    assert {f.kind for f in faults_a} == set(FAULT_KINDS) and len(faults_a) == 60


def test_the_feed_is_issued_for_a_period_the_seed_left_without_readings_on_any_day() -> None:
    # The seed bills the months before today's and leaves today's readings unbilled: on 2026-12-01 (Beijing
    # time) the soak's fixed period 202612 became that month, its tranches billed every household the counters
    # pay, and the soak failed (a cancel refused: its credit applied to new bills; feed bills not in arrears).
    day = dt.date(2026, 1, 1)
    while day < dt.date(2028, 1, 1):
        seeded = {f"{d.year:04d}{d.month:02d}" for d in (day, day + dt.timedelta(days=1))}  # across midnight
        seeded |= set(periods_before(day, 24))
        assert feed_period(day) not in seeded, day
        assert feed_period(day) > f"{day.year:04d}{day.month:02d}", day
        day += dt.timedelta(days=1)


@pytest.mark.timeout(900)
def test_chaos_soak_holds_every_invariant(tmp_path: Path) -> None:
    on_server = IN_CI or reachable_admin_url("postgresql") is not None
    server = ["--mis-db-server", admin_url("postgresql")] if on_server else []
    res = chaos(tmp_path, "--seed", "20261129", "--ops", str(OPS), "--faults", str(FAULTS), *server,
                timeout_s=850)
    print(res.stdout)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    out = res.stdout
    assert re.search(rf"^operations: {OPS} ", out, re.M)
    faults = re.search(rf"^faults: {FAULTS} (.*)$", out, re.M)
    assert faults is not None, out[-3000:]
    kinds = dict(kv.split("=") for kv in faults.group(1).split())
    expected = set(FAULT_KINDS) | ({"db_reset", "db_blackhole"} if on_server else set())
    assert set(kinds) == expected and all(int(n) > 0 for n in kinds.values()), kinds
    assert "reconciliation: 0 discrepancies" in out and "MIS check: 0 discrepancies" in out
    assert "bridge journal: 0 unsettled, 0 disagreements" in out and "still_in_doubt=0" in out
    # Auto-debit through the real bill feed, its worker killed (-9) on the way: checked from both sides.
    feed = re.search(r"^bill feed: (\d+) bills issued in tranches, (\d+) fed, all acknowledged: yes; "
                     r"debited (\d+) = (\d+) fen \(bank ledger (\d+) = (\d+) fen\), .* auto-debit worker "
                     r"killed (\d+); 0 problems", out, re.M)
    assert feed is not None, out[-3000:]
    assert int(feed.group(1)) == int(feed.group(2)) > 0 and int(feed.group(3)) > 0
    assert (feed.group(3), feed.group(4)) == (feed.group(5), feed.group(6)) and int(feed.group(7)) > 0
    assert "chaos seed=20261129 ops=" in out  # the seed is printed
    control = re.search(r"^control totals \(.*: (\d+) samples .* max divergence (\d+) fen; agreeing after "
                        r"quiescence: (\w+); flagged before any tamper: (\d+)", out, re.M)
    assert control is not None, out[-3000:]
    assert int(control.group(1)) > 0 and control.group(2) == "0" and control.group(3) == "yes" \
        and control.group(4) == "0"


@pytest.mark.timeout(300)
def test_a_row_changed_behind_the_systems_back_is_caught(tmp_path: Path) -> None:
    res = chaos(tmp_path, "--seed", "5", "--ops", "300", "--faults", "6", "--tamper", timeout_s=280)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "tampered:" in res.stdout
    assert "WRONG_AMOUNT" in res.stdout and "FAILED" in res.stdout
    # Before the end-of-day checks, continuous reconciliation flagged it on both servers within a minute.
    flagged = re.search(r"^control totals: injected discrepancy flagged in bridge=([\d.]+) s "
                        r"mis_adapter=([\d.]+) s; bridge log names the serial: yes", res.stdout, re.M)
    assert flagged is not None, res.stdout[-3000:]
    assert all(float(flagged.group(k)) < 60.0 for k in (1, 2))
    assert "max divergence 0 fen; agreeing after quiescence: yes; flagged before any tamper: 0" in res.stdout
