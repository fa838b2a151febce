"""`make bench` in miniature: real processes on SQLite, one short step, the
summary printed with the load average; an unreachable PostgreSQL is skipped
with its reason, not failed. (The figures themselves belong to `make bench`.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bank_sim import bench

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_bench_measures_sqlite_and_skips_an_unreachable_postgresql(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = bench.main(["--work-dir", str(tmp_path / "work"), "--accounts", "100", "--rates", "20",
                     "--step-duration-s", "1", "--warmup-s", "0.2", "--backends", "sqlite,postgresql",
                     "--pg-admin-url", "postgresql://postgres@127.0.0.1:1/postgres", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "skipping postgresql: PostgreSQL unreachable" in printed
    assert "bench summary" in printed and "load average" in printed and "ceiling" in printed
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert set(doc["skipped"]) == {"postgresql"}
    [step] = doc["steps"]
    assert step["backend"] == "sqlite" and step["result"]["offered_rate_per_s"] == 20
    assert step["result"]["arrivals"] == 20 and step["result"]["check"]["ok"] is True


def test_rates_are_bounded_and_positive() -> None:
    assert bench.parse_rates("200, 400,800") == [200.0, 400.0, 800.0]
    for bad in ("", "0,100", "-5", ",".join(["1"] * (bench.RATES_MAX + 1))):
        with pytest.raises(ValueError, match="rates"):
            bench.parse_rates(bad)
