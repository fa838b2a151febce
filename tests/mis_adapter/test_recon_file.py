"""`python -m mis_adapter reconcile --file`: a good daily file reconciles the
day; a malformed or inconsistent one is rejected whole, naming its lines,
and nothing changes. On one database and on three branch databases
(`--branch-db`), where the file's records go to their serials' branches
through the same path as the Reconcile stream (recon_branches)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mis_adapter import recon, recon_branches, recon_file
from tests.mis_adapter.test_recon import BANK, World, build_world, cancel, closed_in, pay, snapshot
from tests.support.topology import Topology

pytestmark = [pytest.mark.timeout(120), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema
CLOCK = "2026-11-28T21:00:00+08:00"
DATE = "2026-11-28"
HEADER = "bank_serial,account_no,amount_fen,status"


@pytest.fixture
def world(topology: Topology, tmp_path: Path) -> Iterator[World]:
    w = build_world(topology, tmp_path, accounts=30)
    yield w
    w.ctx.router.dispose()


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli(topo: Topology, path: Path) -> int:
    return recon_file.main([*topo.cli_flags(), "--bank", BANK, "--date", DATE, "--file", str(path),
                            "--clock-start", CLOCK])


def test_daily_file_reconciles_and_bad_files_are_rejected_whole(world: World, topology: Topology, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    w = world
    url = topology
    a = w.accounts  # with branch databases: a[0] in the front's, a[1] in 02's, a[2] in 03's, ...
    pay(w, "F-1", a[0], 1_000)
    pay(w, "F-2", a[1], 2_000)
    pay(w, "F-3", a[2], 300)
    cancel(w, "C-3", "F-3", 300)
    pay(w, "F-4", a[3], 400)  # not in the file: UTILITY_ONLY
    good = [HEADER, f"F-1,{a[0]},1000,POSTED", f"F-2,{a[1]},2000,POSTED", f"F-3,{a[2]},300,CANCELLED",
            f"F-5,{a[4]},550,POSTED"]
    total = 1000 + 2000 + 300 + 550
    bad_files = {
        "bad-line.csv": ([*good[:2], f"F-2,{a[1]},20x0,POSTED", *good[3:], f"TRAILER,4,{total}"],
                         ["line 3.amount_fen"]),
        "bad-account.csv": ([*good[:4], f"F-5,{a[4][:9]}0,550,POSTED", f"TRAILER,4,{total}"]
                            if a[4][9] != "0" else [*good[:4], f"F-5,{a[4][:9]}1,550,POSTED", f"TRAILER,4,{total}"],
                            ["line 5.account_no"]),
        "wrong-count.csv": ([*good, f"TRAILER,5,{total}"], ["line 6: record count"]),
        "wrong-total.csv": ([*good, f"TRAILER,4,{total + 1}"], ["line 6: total fen"]),
        "duplicate.csv": ([*good, f"F-1,{a[0]},1000,POSTED", f"TRAILER,5,{total + 1000}"],
                          ["F-1 at line 2 and line 6"]),
        "no-trailer.csv": (good, ["no trailer line"]),
        "after-trailer.csv": ([*good, f"TRAILER,4,{total}", f"F-9,{a[0]},1,POSTED"], ["line 7"]),
        "bad-header.csv": (["serial,account,amount,status", *good[1:], f"TRAILER,4,{total}"], ["line 1"]),
    }
    snap = snapshot(w)
    for name, (lines, wanted) in bad_files.items():
        assert cli(url, write(tmp_path, name, lines)) == 2, name
        err = capsys.readouterr().err
        assert "nothing applied" in err, name
        for want in wanted:
            assert want in err, (name, err)
    assert snapshot(w) == snap

    assert cli(url, write(tmp_path, "good.csv", [*good, f"TRAILER,4,{total}"])) == 0
    out = capsys.readouterr().out
    summary = recon_branches.day_summary(w.ctx.router, BANK, w.clock.now().date())
    assert summary is not None
    got = {t.outcome: (t.count, t.amount_fen) for t in summary.totals}
    assert got == {recon.MATCHED: (3, 3_300), recon.BANK_ONLY: (1, 550), recon.UTILITY_ONLY: (1, 400),
                   recon.MISMATCH: (0, 0)}
    assert summary.net_settlement_fen == 1_000 + 2_000 + 550
    assert "net_settlement_fen=3550" in out and "F-4" in out and "line 5" in out
    # The same file again: the stored result, nothing changes.
    snap2 = snapshot(w)
    assert cli(url, write(tmp_path, "again.csv", [*good, f"TRAILER,4,{total}"])) == 0
    assert "already reconciled" in capsys.readouterr().out
    assert snapshot(w) == snap2
    assert closed_in(w) == list(range(len(w.engines)))  # the day closed in every database
