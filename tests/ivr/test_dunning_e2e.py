"""Voice dunning end to end: a real mis_adapter on SQLite and `python -m ivr
dunning` run as the operator would (cron), each run on an injected clock
(--clock-start). The MIS holds every attempt; the recording dialer answers
as each household is scripted to; call files are what Asterisk reads."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ivr import dunning_cmd
from ivr.accounts import Overview
from ivr.customer_client import CustomerClient
from ivr.dialer import parse_call_file
from ivr.dunning_cmd import Campaign
from ivr.prompts import PromptRenderer
from ivr.settings import DunningSettings
from tests.ivr.stack import DUNNING_OPERATOR, Mis, make_mis_db, running_mis
from tests.support.mis_data import BillSpec
from tests.support.procs import REPO
from yindian.v1 import customer_pb2 as pb
from yindian_common.clock import ManualClock
from yindian_common.settings import load_settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CAMPAIGN = "DUN-TEST-1"
OP_MD = (("x-yindian-operator", DUNNING_OPERATOR),)
OVERDUE = dt.date(2026, 11, 10)
# serial: (bills, phone)
HOUSEHOLDS = {
    1: ([BillSpec("202610", 12_345, OVERDUE)], "13900000001"),   # the retry schedule
    2: ([BillSpec("202610", 5_000, OVERDUE)], "13900000002"),    # never answers: the cap
    3: ([BillSpec("202610", 7_000, OVERDUE)], "13900000003"),    # opted out in the MIS
    4: ([BillSpec("202610", 8_000, OVERDUE)], "13900000004"),    # on the operator's opt-out list
    5: ([BillSpec("202611", 9_000, dt.date(2026, 11, 27))], "13900000005"),  # 1 day overdue: too fresh
    6: ([BillSpec("202610", 6_000, OVERDUE)], "13900000006"),    # pays during the campaign
    7: ([BillSpec("202610", 50, OVERDUE)], "13900000007"),       # below the threshold
    8: ([BillSpec("202610", 4_000, OVERDUE)], ""),               # no phone registered
}


@dataclass
class Dunning:
    mis: Mis
    tmp: Path
    accounts: dict[int, str]
    runs: int = 0

    def run(self, local: str, *extra: str, campaign: str = CAMPAIGN, backend: str = "recording",
            own_process: bool = False) -> dict:
        """One `ivr dunning` pass at Shanghai local time `local`; returns its JSON report.
        In this process through the command's main() (fast), or as `python -m ivr dunning`."""
        self.runs += 1
        report = self.tmp / f"report-{self.runs}.json"
        args = ["--upstream", self.mis.addr, "--insecure",
                "--operator", DUNNING_OPERATOR, "--spool-dir", str(self.tmp / "spool"),
                "--prompt-dir", str(self.tmp / "prompts"), "--clock-start", f"{local}+08:00",
                "--campaign-id", campaign, "--backend", backend, "--min-arrears-fen", "100",
                "--min-days-overdue", "3", "--recording-outcomes", str(self.tmp / "script.json"),
                "--opt-out-file", str(self.tmp / "opt-out.txt"), "--report-json", str(report), *extra]
        if own_process:
            done = subprocess.run([sys.executable, "-m", "ivr", "dunning", *args], cwd=REPO, capture_output=True,
                                  text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            rc, out = done.returncode, done.stdout + done.stderr
        else:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                rc = dunning_cmd.main(args)
            out = buf.getvalue()
        (self.tmp / f"run-{self.runs}.log").write_text(out)
        assert rc == 0, out
        for _serial, (_bills, phone) in HOUSEHOLDS.items():
            assert not phone or phone not in out  # masked in logs and report
        return dict(json.loads(report.read_text()), stdout=out)

    def attempts(self, serial: int, campaign: str = "") -> list[tuple[int, str]]:
        r = self.mis.customer.ListDunningAttempts(pb.ListDunningAttemptsRequest(
            account_no=self.accounts[serial], campaign_id=campaign), metadata=OP_MD, timeout=10)
        return [(a.attempt_no, pb.DunningOutcome.Name(a.outcome).removeprefix("DUNNING_OUTCOME_"))
                for a in r.attempts]

    def calls(self) -> list[dict]:
        path = self.tmp / "spool" / "recorded-calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def calls_to(self, serial: int) -> list[str]:
        return [c["outcome"] for c in self.calls() if c["account_no"] == self.accounts[serial]]


@pytest.fixture
def dunning(tmp_path: Path) -> Iterator[Dunning]:
    url, accounts = make_mis_db(tmp_path, HOUSEHOLDS)
    (tmp_path / "script.json").write_text(json.dumps({
        accounts[1]: ["NO_ANSWER", "BUSY", "ANSWERED"], accounts[2]: ["NO_ANSWER"] * 20,
        accounts[6]: ["NO_ANSWER"]}))
    (tmp_path / "opt-out.txt").write_text(f"# asked at the counter\n{accounts[4]}\n")
    with running_mis(tmp_path, url) as mis:
        mis.customer.SetDunningOptOut(pb.SetDunningOptOutRequest(account_no=accounts[3], opted_out=True,
                                                                 reason="asked on the phone"), metadata=OP_MD)
        yield Dunning(mis, tmp_path, accounts)


def test_quiet_hours_place_no_calls(dunning: Dunning) -> None:
    for local in ("2026-11-28T21:00:00", "2026-11-28T23:59:00", "2026-11-29T07:59:00"):
        r = dunning.run(local, own_process=local.endswith("21:00:00"))
        assert r["quiet_until"] == "2026-11-29T08:00:00+08:00"
        assert r["outcomes"] == {} and "quiet hours" in r["stdout"]
    assert dunning.calls() == [] and dunning.attempts(1) == []
    r = dunning.run("2026-11-29T08:00:00", own_process=True)      # the first minute after quiet hours
    assert r["quiet_until"] is None
    assert {c["account_no"] for c in dunning.calls()} == {dunning.accounts[s] for s in (1, 2, 6)}
    assert dunning.attempts(1, CAMPAIGN) == [(1, "NO_ANSWER")]


def test_retry_schedule_for_no_answer_and_busy(dunning: Dunning) -> None:
    steps = [("2026-11-28T10:00:00", ["NO_ANSWER"]),
             ("2026-11-28T11:59:00", ["NO_ANSWER"]),                       # 2 h after NO_ANSWER not yet up
             ("2026-11-28T12:01:00", ["NO_ANSWER", "BUSY"]),
             ("2026-11-28T12:30:00", ["NO_ANSWER", "BUSY"]),               # 30 min after BUSY not yet up
             ("2026-11-28T12:32:00", ["NO_ANSWER", "BUSY", "ANSWERED"]),
             ("2026-11-28T16:00:00", ["NO_ANSWER", "BUSY", "ANSWERED"])]   # reached: not called again
    for local, calls in steps:
        r = dunning.run(local)
        assert dunning.calls_to(1) == calls, local
    assert dunning.attempts(1, CAMPAIGN) == [(1, "NO_ANSWER"), (2, "BUSY"), (3, "ANSWERED")]
    assert r["held"]["REACHED"] == 2             # households 1 and 6 (answered its second call)
    fifth = json.loads((dunning.tmp / "report-5.json").read_text())
    assert fifth["outcomes"]["ANSWERED"] == 1
    assert fifth["arrears_reached_fen"] == 12_345   # household 1 (household 2 never answers)
    assert "arrears reached: 12345 fen (123.45 yuan)" in (dunning.tmp / "run-5.log").read_text()


def test_at_most_seven_attempts_in_seven_days(dunning: Dunning) -> None:
    start = dt.datetime(2026, 11, 28, 10, 0)
    for i in range(9):                          # every 2 minutes, NO_ANSWER retried after 60 s
        dunning.run((start + dt.timedelta(minutes=2 * i)).isoformat(), "--retry-no-answer-s", "60")
    assert dunning.calls_to(2) == ["NO_ANSWER"] * 7
    assert [n for n, _ in dunning.attempts(2)] == list(range(1, 8))
    r = dunning.run((start + dt.timedelta(minutes=30)).isoformat(), "--retry-no-answer-s", "60",
                    campaign="DUN-TEST-2")      # another campaign: the household's cap still holds
    assert r["held"]["CAPPED"] >= 1 and dunning.calls_to(2) == ["NO_ANSWER"] * 7
    # Seven days after the first attempt it leaves the window: one more call, then capped again.
    later = start + dt.timedelta(days=7, minutes=1)
    dunning.run(later.isoformat(), "--retry-no-answer-s", "30")
    assert dunning.calls_to(2) == ["NO_ANSWER"] * 8
    r = dunning.run((later + dt.timedelta(seconds=40)).isoformat(), "--retry-no-answer-s", "30")
    assert r["held"]["CAPPED"] >= 1 and dunning.calls_to(2) == ["NO_ANSWER"] * 8  # 7 in the last 7 days again


def test_opted_out_households_are_never_called(dunning: Dunning) -> None:
    dunning.run("2026-11-28T10:00:00")
    dunning.run("2026-11-28T14:00:00")
    called = {c["account_no"] for c in dunning.calls()}
    assert dunning.accounts[3] not in called and dunning.accounts[4] not in called
    assert dunning.attempts(3) == [(1, "SKIPPED_OPT_OUT")]       # recorded once per campaign
    assert dunning.attempts(4) == [(1, "SKIPPED_OPT_OUT")]
    assert dunning.accounts[5] not in called and dunning.accounts[7] not in called  # too fresh, too small
    assert dunning.accounts[8] not in called and dunning.attempts(8) == []        # nothing to dial, nothing counted
    dunning.mis.customer.SetDunningOptOut(pb.SetDunningOptOutRequest(
        account_no=dunning.accounts[3], opted_out=False), metadata=OP_MD)
    dunning.run("2026-11-28T14:05:00")
    assert dunning.calls_to(3) == ["ANSWERED"]
    assert dunning.attempts(3) == [(1, "SKIPPED_OPT_OUT"), (2, "ANSWERED")]


def test_household_that_pays_is_dropped(dunning: Dunning) -> None:
    dunning.run("2026-11-28T10:00:00")
    assert dunning.calls_to(6) == ["NO_ANSWER"]
    q = dunning.mis.query(dunning.accounts[6])
    dunning.mis.pay(dunning.accounts[6], "DUN-PAY-6", q.total_due_fen)   # pays at the counter meanwhile
    r = dunning.run("2026-11-28T12:30:00")
    assert dunning.calls_to(6) == ["NO_ANSWER"]                          # not called again
    assert dunning.attempts(6, CAMPAIGN) == [(1, "NO_ANSWER"), (2, "SKIPPED_PAID")]
    assert r["outcomes"]["SKIPPED_PAID"] == 1
    dunning.run("2026-11-28T15:00:00")
    assert dunning.attempts(6, CAMPAIGN) == [(1, "NO_ANSWER"), (2, "SKIPPED_PAID")]  # dropped for good


def test_call_files_are_valid_and_their_outcomes_come_back(dunning: Dunning) -> None:
    spool = dunning.tmp / "spool"
    r = dunning.run("2026-11-28T10:00:00", "--channel-template", "PJSIP/{phone}@carrier", backend="callfile")
    assert r["outcomes"] == {"PLACED": 3, "SKIPPED_OPT_OUT": 2}
    files = sorted((spool / "outgoing").glob("*.call"))
    assert [f.name for f in files] == sorted(f"yindian-{CAMPAIGN}-{dunning.accounts[s]}-1.call" for s in (1, 2, 6))
    assert list((spool / "tmp").iterdir()) == []               # nothing half-written left behind
    placed_at = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC).timestamp()
    for f in files:
        text = f.read_text()
        assert all(line.split(": ", 1)[0] in {"Channel", "CallerID", "MaxRetries", "RetryTime", "WaitTime",
                                              "Context", "Extension", "Priority", "Archive", "Set"}
                   and ": " in line for line in text.splitlines())
        headers, variables = parse_call_file(text)
        account = variables["YINDIAN_ACCOUNT"]
        serial = next(s for s, a in dunning.accounts.items() if a == account)
        assert headers["Channel"] == f"PJSIP/{HOUSEHOLDS[serial][1]}@carrier"
        assert headers["MaxRetries"] == "0" and headers["RetryTime"] == "300" and headers["WaitTime"] == "45"
        assert headers["Context"] == "yindian-dunning" and headers["Priority"] == "1"
        assert variables["YINDIAN_CAMPAIGN"] == CAMPAIGN and variables["YINDIAN_ATTEMPT"] == "1"
        assert Path(variables["YINDIAN_PROMPT"] + ".wav").stat().st_size > 10_000
        assert abs(f.stat().st_mtime - placed_at) < 30          # mtime = when Asterisk may dial
    assert dunning.attempts(1, CAMPAIGN) == [(1, "PLACED")]
    # Asterisk dials, then archives the files with their status.
    (spool / "outgoing_done").mkdir(exist_ok=True)
    for f, status in zip(files, ("Completed", "Expired", "Failed"), strict=True):
        (spool / "outgoing_done" / f.name).write_text(f.read_text() + f"Status: {status}\n")
        f.unlink()
    r = dunning.run("2026-11-28T10:30:00", backend="callfile")
    assert r["harvested"] == {"ANSWERED": 1, "FAILED": 1, "NO_ANSWER": 1}
    outcomes = {s: dunning.attempts(s, CAMPAIGN)[0] for s in (1, 2, 6)}
    by_file = dict(zip([f.name for f in files], ("ANSWERED", "NO_ANSWER", "FAILED"), strict=True))
    for s in (1, 2, 6):
        assert outcomes[s] == (1, by_file[f"yindian-{CAMPAIGN}-{dunning.accounts[s]}-1.call"])
    assert list((spool / "outgoing").glob("*.call")) == []    # retries wait their schedule
    assert list((spool / "outgoing_done").glob("*.call")) == []  # each outcome harvested once


class PaysAtTheLastMoment(CustomerClient):
    """The MIS as seen by a campaign while household 1 pays at a bank counter
    after the candidates were listed and before it is dialed."""

    def __init__(self, dunning: Dunning) -> None:
        super().__init__(grpc.insecure_channel(dunning.mis.addr), DUNNING_OPERATOR, 10.0)
        self.dunning = dunning

    def overview(self, account_no: str) -> Overview:
        if account_no == self.dunning.accounts[1]:
            q = self.dunning.mis.query(account_no)
            if q.total_due_fen:
                self.dunning.mis.pay(account_no, "LAST-MOMENT-1", q.total_due_fen)
        return super().overview(account_no)


def test_household_paying_just_before_the_call_is_not_called(dunning: Dunning) -> None:
    settings = load_settings(DunningSettings, {
        "upstream": dunning.mis.addr, "insecure": True, "spool_dir": str(dunning.tmp / "spool"),
        "prompt_dir": str(dunning.tmp / "prompts"), "campaign_id": CAMPAIGN, "backend": "recording",
        "min_arrears_fen": 100, "min_days_overdue": 3, "recording_outcomes": str(dunning.tmp / "script.json")})
    clock = ManualClock(dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.timezone(dt.timedelta(hours=8))))
    campaign = Campaign(settings, clock, PaysAtTheLastMoment(dunning), dunning_cmd.build_dialer(settings),
                        PromptRenderer(settings.prompts()), frozenset())
    report = asyncio.run(campaign.run())
    assert dunning.calls_to(1) == []
    assert dunning.attempts(1, CAMPAIGN) == [(1, "SKIPPED_PAID")]
    assert report.outcomes["SKIPPED_PAID"] == 1 and dunning.calls_to(2) == ["NO_ANSWER"]


def test_overlapping_passes_never_both_run(dunning: Dunning) -> None:
    args = ["--upstream", dunning.mis.addr, "--insecure", "--operator", DUNNING_OPERATOR,
            "--spool-dir", str(dunning.tmp / "spool"), "--prompt-dir", str(dunning.tmp / "prompts"),
            "--backend", "recording", "--clock-start", "2026-11-28T10:00:00+08:00"]
    out = io.StringIO()
    with dunning_cmd.campaign_lock(dunning.tmp / "spool"), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        assert dunning_cmd.main(args) == dunning_cmd.EXIT_BUSY   # a cron run while the last one still runs
    assert "another dunning pass" in out.getvalue()
    assert dunning.calls() == [] and dunning.attempts(1) == []
