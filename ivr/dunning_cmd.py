"""`python -m ivr dunning`: one pass of a voice dunning campaign.

    1. harvest outcomes of calls placed earlier (Asterisk's archived call files)
       and record them in the MIS;
    2. in quiet hours, place nothing (the report says when calls may start);
    3. otherwise, for each household in arrears (ListDunningCandidates), decide
       from its attempts in the MIS (ivr.dunning.decide); for one to call:
       re-check it still owes (GetAccountOverview: paid → SKIPPED_PAID),
       render its personalised reminder, record the attempt PLACED, place it,
       and record the final outcome when the dialer knows it;
    4. print the campaign report (counts per outcome, fen in arrears reached).

Run it again (cron, every few minutes) to carry out the retry schedule: all
state is in the MIS, so a restart changes nothing. Phone numbers stay in
this process and the call files; logs mask them."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ivr import phrases
from ivr.accounts import Candidate
from ivr.chinese_numerals import date_words
from ivr.customer_client import AccountUnknown, AttemptConflict, CustomerClient, CustomerError
from ivr.dialer import CallFileDialer, CallFileOptions, CallRequest, Dialer, RecordingDialer, check_phone
from ivr.dunning import CALL, CAPPED, OPT_OUT, WAITING_RETRY, DunningPolicy, decide, in_quiet_hours, quiet_hours_end
from ivr.prompts import PromptError, PromptRenderer
from ivr.settings import DunningSettings
from yindian_common import fields
from yindian_common.clock import Clock, business_date, make_clock
from yindian_common.errors import InvalidField
from yindian_common.fields import mask_phone
from yindian_common.logs import setup_logging
from yindian_common.server import open_channel
from yindian_common.settings import add_settings_flags, load_settings

log = logging.getLogger("yindian.ivr.dunning")

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_UPSTREAM = 3
EXIT_PROMPT = 4
EXIT_BUSY = 5
_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


def parse(argv: list[str]) -> DunningSettings:
    parser = argparse.ArgumentParser(prog="python -m ivr dunning",
                                     description="Run one pass of a voice dunning campaign (自动语音催费).")
    add_settings_flags(parser, DunningSettings)
    args = parser.parse_args(argv)
    return load_settings(DunningSettings, args, args.config_file)


def _hhmm(value: str, name: str) -> dt.time:
    m = _TIME_RE.fullmatch(value)
    if m is None:
        raise InvalidField(name, "must be HH:MM")
    return dt.time(int(m.group(1)), int(m.group(2)))


def policy_of(s: DunningSettings, clock: Clock) -> DunningPolicy:
    return DunningPolicy(
        tz=clock.tz, quiet_start=_hhmm(s.quiet_start, "quiet_start"), quiet_end=_hhmm(s.quiet_end, "quiet_end"),
        attempts_window=dt.timedelta(days=s.attempts_window_days), attempts_max=s.attempts_max,
        retry_after={"NO_ANSWER": dt.timedelta(seconds=s.retry_no_answer_s),
                     "BUSY": dt.timedelta(seconds=s.retry_busy_s),
                     "FAILED": dt.timedelta(seconds=s.retry_failed_s),
                     "PLACED": dt.timedelta(seconds=s.retry_placed_s)})


def read_opt_out_file(path: str, entries_max: int) -> frozenset[str]:
    """Account numbers never to call: one a line, `#` starts a comment."""
    if not path:
        return frozenset()
    accounts: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if n > entries_max:
                raise InvalidField("opt_out_file", f"more than {entries_max} lines")
            line = raw.split("#", 1)[0].strip()
            if line:
                accounts.add(fields.account_no(line, f"opt_out_file line {n}"))
    return frozenset(accounts)


def read_outcome_script(path: str) -> dict[str, list[str]]:
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise InvalidField("recording_outcomes", "must be a JSON object {account_no: [outcome, ...]}")
    return {str(k): [str(o) for o in v] for k, v in data.items()}


@dataclass
class CampaignReport:
    campaign_id: str
    at: dt.datetime
    as_of_date: dt.date
    candidates: int = 0
    calls: int = 0                                             # placed this run
    outcomes: Counter[str] = field(default_factory=Counter)   # recorded in the MIS this run
    held: Counter[str] = field(default_factory=Counter)       # not called this run, and why
    harvested: Counter[str] = field(default_factory=Counter)  # outcomes of earlier calls
    arrears_reached_fen: int = 0
    quiet_until: dt.datetime | None = None

    def as_dict(self) -> dict[str, object]:
        return {"campaign_id": self.campaign_id, "at": self.at.isoformat(), "as_of_date": self.as_of_date.isoformat(),
                "candidates": self.candidates, "calls": self.calls, "outcomes": dict(sorted(self.outcomes.items())),
                "held": dict(sorted(self.held.items())), "harvested": dict(sorted(self.harvested.items())),
                "arrears_reached_fen": self.arrears_reached_fen,
                "quiet_until": self.quiet_until.isoformat() if self.quiet_until else None}

    def lines(self) -> list[str]:
        out = [f"campaign {self.campaign_id} at {self.at.isoformat()} (arrears as of {self.as_of_date}): "
               f"{self.candidates} households in arrears, {self.calls} calls placed"]
        if self.quiet_until is not None:
            out.append(f"quiet hours: no calls placed; calls may start at {self.quiet_until.isoformat()}")
        for title, counts in (("outcome", self.outcomes), ("held", self.held), ("harvested", self.harvested)):
            for key, n in sorted(counts.items()):
                out.append(f"  {title:<9} {key:<18} {n:>6}")
        out.append(f"  arrears reached: {self.arrears_reached_fen} fen ({self.arrears_reached_fen / 100:,.2f} yuan)")
        return out


class Campaign:
    def __init__(self, settings: DunningSettings, clock: Clock, client: CustomerClient, dialer: Dialer,
                 prompts: PromptRenderer, opt_outs: frozenset[str]) -> None:
        self.s = settings
        self.clock = clock
        self.client = client
        self.dialer = dialer
        self.prompts = prompts
        self.opt_outs = opt_outs
        self.policy = policy_of(settings, clock)
        today = business_date(clock)
        self.campaign_id = fields.serial(settings.campaign_id or f"DUN-{today:%Y%m}", "campaign_id")
        self.report = CampaignReport(self.campaign_id, clock.now(), today)
        self.pending: set[str] = set()  # called in this campaign, not reached yet

    def _record(self, account_no: str, attempt_no: int, outcome: str, detail: str = "", *,
                count: bool = True) -> bool:
        """Records an attempt in the MIS; True when it was stored already (a replay)."""
        replayed = self.client.record(self.campaign_id, account_no, attempt_no, outcome, self.clock.now(), detail)
        if count:
            self.report.outcomes[outcome] += 1
        return replayed

    def _pending_path(self) -> Path:
        return Path(self.s.spool_dir) / "yindian-dunning" / f"pending-{self.campaign_id}.txt"

    def _read_pending(self) -> set[str]:
        """Households this campaign called without reaching them yet: a hint kept
        beside the spool so that one who paid (and so left the candidates) is
        recorded SKIPPED_PAID. The MIS stays the authority for every count."""
        path = self._pending_path()
        if not path.exists():
            return set()
        lines = path.read_text("ascii").split()[: self.s.pending_households_max]
        return {a for a in lines if len(a) == fields.ACCOUNT_NO_LEN and a.isdigit()}

    def _write_pending(self, pending: set[str]) -> None:
        path = self._pending_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{a}\n" for a in sorted(pending)), "ascii")
        os.replace(tmp, path)

    def harvest(self) -> None:
        for h in self.dialer.harvest():
            try:
                self.client.record(h.campaign_id, h.account_no, h.attempt_no, h.outcome, self.clock.now(), h.detail)
            except AccountUnknown:
                log.warning("event=harvest_unknown_account tail=%s", h.account_no[-4:])
            except AttemptConflict as exc:  # the MIS holds another final outcome: it stays, we report
                log.warning("event=harvest_conflict tail=%s attempt=%d error=%r", h.account_no[-4:],
                            h.attempt_no, str(exc))
            self.dialer.done(h)
            self.report.harvested[h.outcome] += 1

    async def run(self) -> CampaignReport:
        self.harvest()
        now = self.clock.now()
        if in_quiet_hours(now, self.policy):
            self.report.quiet_until = quiet_hours_end(now, self.policy)
            log.info("event=quiet_hours until=%s", self.report.quiet_until.isoformat())
            return self.report
        calls = 0
        previously = self._read_pending()
        pending = set(previously)
        for cand in self.client.candidates(self.report.as_of_date, self.s.min_arrears_fen, self.s.min_days_overdue,
                                           self.s.candidate_pages_max):
            self.report.candidates += 1
            pending.discard(cand.account_no)
            held = ("CALLS_PER_RUN_MAX" if calls >= self.s.calls_per_run_max else
                    "QUIET_HOURS" if in_quiet_hours(self.clock.now(), self.policy) else "")  # the run crossed 21:00
            if held:
                self.report.held[held] += 1
                if cand.account_no in previously:
                    self.pending.add(cand.account_no)
                continue
            calls += await self._one(cand)
        for account_no in sorted(pending):  # called before, no longer in arrears enough to be a candidate
            self._drop_if_paid(account_no)
        self._write_pending(self.pending)
        return self.report

    def _drop_if_paid(self, account_no: str) -> None:
        in_campaign = self.client.attempts(account_no, campaign_id=self.campaign_id)
        if any(a.outcome in ("ANSWERED", "SKIPPED_PAID", "SKIPPED_OPT_OUT") for a in in_campaign):
            return
        fresh = self.client.overview(account_no)
        if fresh.arrears_fen == 0:
            attempt_no = max((a.attempt_no for a in in_campaign), default=0) + 1
            self._record(account_no, attempt_no, "SKIPPED_PAID", "paid after an earlier attempt")
        else:
            self.report.held["BELOW_THRESHOLD"] += 1

    async def _one(self, cand: Candidate) -> int:
        """Handles one household; returns 1 when a call was placed."""
        now = self.clock.now()
        window = self.client.attempts(cand.account_no, since=now - self.policy.attempts_window)
        in_campaign = self.client.attempts(cand.account_no, campaign_id=self.campaign_id)
        d = decide(campaign_id=self.campaign_id, opted_out=cand.opted_out or cand.account_no in self.opt_outs,
                   window_attempts=window, campaign_attempts=in_campaign, now=now, policy=self.policy)
        if d.action == OPT_OUT:
            self._record(cand.account_no, d.attempt_no, "SKIPPED_OPT_OUT",
                         "MIS opt-out" if cand.opted_out else "opt-out list")
            return 0
        if d.action != CALL:
            self.report.held[d.action] += 1
            if d.action in (WAITING_RETRY, CAPPED):
                self.pending.add(cand.account_no)
            return 0
        try:
            check_phone(cand.phone)
        except ValueError:  # nothing to dial: no attempt to count against the household
            log.warning("event=no_dialable_phone tail=%s phone=%s", cand.account_no[-4:], mask_phone(cand.phone))
            self.report.held["NO_DIALABLE_PHONE"] += 1
            return 0
        # Just before dialing: has the household paid meanwhile?
        fresh = self.client.overview(cand.account_no)
        if fresh.arrears_fen == 0:
            self._record(cand.account_no, d.attempt_no, "SKIPPED_PAID", "no arrears when rechecked")
            return 0
        due = fresh.earliest_unpaid_due_date or cand.oldest_due_date
        text = phrases.dunning_reminder(cand.account_no, fresh.arrears_fen, fresh.late_fee_fen, date_words(due))
        stem = await self.prompts.render(text)
        # Recorded before it is placed: a crash after dialing can never lose an attempt from the cap.
        if self._record(cand.account_no, d.attempt_no, "PLACED", count=False):
            # Someone recorded this very attempt already: it was placed; never dial twice.
            log.warning("event=attempt_already_recorded tail=%s attempt=%d", cand.account_no[-4:], d.attempt_no)
            self.report.held["ALREADY_PLACED"] += 1
            return 0
        self.report.calls += 1
        call = CallRequest(self.campaign_id, cand.account_no, d.attempt_no, cand.phone, stem.resolve(),
                           self.clock.now())
        try:
            outcome = self.dialer.place(call)
        except (OSError, ValueError) as exc:
            log.warning("event=call_not_placed tail=%s phone=%s error=%r", cand.account_no[-4:],
                        mask_phone(cand.phone), str(exc))
            self._record(cand.account_no, d.attempt_no, "FAILED", f"dialer: {type(exc).__name__}")
            return 1
        log.info("event=call_placed campaign=%s tail=%s attempt=%d phone=%s outcome=%s", self.campaign_id,
                 cand.account_no[-4:], d.attempt_no, mask_phone(cand.phone), outcome)
        if outcome == "PLACED":  # the final outcome comes back with the archived call file
            self.report.outcomes["PLACED"] += 1
        else:
            self._record(cand.account_no, d.attempt_no, outcome)
        if outcome == "ANSWERED":
            self.report.arrears_reached_fen += fresh.arrears_fen
        else:
            self.pending.add(cand.account_no)
        return 1


class PassRunning(Exception):
    pass


@contextlib.contextmanager
def campaign_lock(spool_dir: Path) -> Iterator[None]:
    """One dunning pass at a time per spool: two overlapping cron runs could
    otherwise both decide to call the same household."""
    path = spool_dir / "yindian-dunning" / "pass.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PassRunning(f"another dunning pass holds {path}") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build_dialer(s: DunningSettings) -> Dialer:
    spool = Path(s.spool_dir)
    if s.backend == "callfile":
        return CallFileDialer(spool, CallFileOptions(
            channel_template=s.channel_template, caller_id=s.caller_id, context=s.context,
            wait_time_s=s.wait_time_s, max_retries=s.max_retries, retry_time_s=s.retry_time_s))
    if s.backend == "recording":
        path = Path(s.recording_file) if s.recording_file else spool / "recorded-calls.jsonl"
        return RecordingDialer(path, read_outcome_script(s.recording_outcomes))
    raise InvalidField("backend", "must be callfile or recording")


def main(argv: list[str]) -> int:
    s = parse(argv)
    setup_logging(s.log_level, "ivr-dunning")
    clock = make_clock(s.clock_start or None, s.timezone)
    try:
        opt_outs = read_opt_out_file(s.opt_out_file, s.opt_out_entries_max)
        dialer = build_dialer(s)
        channel = open_channel(s.upstream, tls=s.tls(), insecure=s.insecure, force_insecure=s.force_insecure)
        client = CustomerClient(channel, s.operator, s.upstream_timeout_s, s.candidates_page_size)
        campaign = Campaign(s, clock, client, dialer, PromptRenderer(s.prompts()), opt_outs)
    except (InvalidField, OSError, ValueError) as exc:
        print(f"error: {exc}")
        return EXIT_BAD_INPUT
    try:
        with campaign_lock(Path(s.spool_dir)):
            report = asyncio.run(campaign.run())
    except PassRunning as exc:
        print(f"not run: {exc}")
        return EXIT_BUSY
    except (CustomerError, PromptError) as exc:
        print(f"error: {exc}")
        for line in campaign.report.lines():
            print(line)
        return EXIT_UPSTREAM if isinstance(exc, CustomerError) else EXIT_PROMPT
    finally:
        channel.close()
    for line in report.lines():
        print(line)
    if s.report_json:
        Path(s.report_json).write_text(json.dumps(report.as_dict(), ensure_ascii=False, indent=2) + "\n")
    return EXIT_OK
