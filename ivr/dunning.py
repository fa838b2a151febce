"""Voice dunning policy (自动语音催费): whom to call now, as a pure function
of a household's recorded attempts, the opt-out lists and the clock.

Rules (all in DunningPolicy):
  - quiet hours: no call between quiet_start and quiet_end, local time
    (21:00-08:00 Asia/Shanghai by default);
  - opt-out (the MIS flag or the operator's list): never called; recorded
    once per campaign as SKIPPED_OPT_OUT;
  - a household that answered in this campaign is not called again in it;
  - at most attempts_max calls (PLACED, ANSWERED, NO_ANSWER, BUSY, FAILED)
    per household within attempts_window, whatever the campaign, counted
    from the MIS so a restart never resets it;
  - after NO_ANSWER, BUSY, FAILED (or a PLACED call whose outcome never
    came back) the next call waits retry_after[outcome].
Whether the household still owes is checked by the caller just before
dialing (SKIPPED_PAID). No I/O here."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from ivr.accounts import Attempt

CALL_OUTCOMES = frozenset({"PLACED", "ANSWERED", "NO_ANSWER", "BUSY", "FAILED"})

CALL = "CALL"
OPT_OUT = "OPT_OUT"                  # record SKIPPED_OPT_OUT
OPT_OUT_RECORDED = "OPT_OUT_RECORDED"
REACHED = "REACHED"                  # answered earlier in this campaign
CAPPED = "CAPPED"
WAITING_RETRY = "WAITING_RETRY"


@dataclass(frozen=True)
class DunningPolicy:
    tz: ZoneInfo
    quiet_start: dt.time = dt.time(21, 0)
    quiet_end: dt.time = dt.time(8, 0)
    attempts_window: dt.timedelta = dt.timedelta(days=7)
    attempts_max: int = 7
    retry_after: dict[str, dt.timedelta] = field(default_factory=lambda: {
        "NO_ANSWER": dt.timedelta(hours=2), "BUSY": dt.timedelta(minutes=30),
        "FAILED": dt.timedelta(hours=4), "PLACED": dt.timedelta(hours=1)})

    def __post_init__(self) -> None:
        if self.attempts_max < 1 or self.attempts_window <= dt.timedelta(0):
            raise ValueError("attempts_max and attempts_window must be positive")
        if self.quiet_start == self.quiet_end:
            raise ValueError("quiet hours must not be empty or the whole day")


def in_quiet_hours(now: dt.datetime, policy: DunningPolicy) -> bool:
    t = now.astimezone(policy.tz).time()
    if policy.quiet_start > policy.quiet_end:  # spans midnight (21:00-08:00)
        return t >= policy.quiet_start or t < policy.quiet_end
    return policy.quiet_start <= t < policy.quiet_end


def quiet_hours_end(now: dt.datetime, policy: DunningPolicy) -> dt.datetime:
    """When calls may start again (now, if not in quiet hours)."""
    if not in_quiet_hours(now, policy):
        return now
    local = now.astimezone(policy.tz)
    end = local.replace(hour=policy.quiet_end.hour, minute=policy.quiet_end.minute, second=0, microsecond=0)
    if end <= local:
        end += dt.timedelta(days=1)
    return end


@dataclass(frozen=True)
class Decision:
    action: str
    attempt_no: int = 0
    not_before: dt.datetime | None = None
    calls_in_window: int = 0


def decide(*, campaign_id: str, opted_out: bool, window_attempts: Sequence[Attempt],
           campaign_attempts: Sequence[Attempt], now: dt.datetime, policy: DunningPolicy) -> Decision:
    """What to do with one household in arrears right now.

    window_attempts: its attempts (any campaign) placed within the window;
    campaign_attempts: all its attempts in this campaign."""
    next_no = max((a.attempt_no for a in campaign_attempts), default=0) + 1
    if opted_out:
        if any(a.outcome == "SKIPPED_OPT_OUT" for a in campaign_attempts):
            return Decision(OPT_OUT_RECORDED)
        return Decision(OPT_OUT, attempt_no=next_no)
    if any(a.outcome == "ANSWERED" for a in campaign_attempts):
        return Decision(REACHED)
    window_start = now - policy.attempts_window
    calls = [a for a in window_attempts if a.outcome in CALL_OUTCOMES and a.placed_at >= window_start]
    if len(calls) >= policy.attempts_max:
        # The oldest call in the window leaves it first.
        oldest = min(a.placed_at for a in calls)
        return Decision(CAPPED, not_before=oldest + policy.attempts_window, calls_in_window=len(calls))
    campaign_calls = [a for a in campaign_attempts if a.outcome in CALL_OUTCOMES]
    if campaign_calls:
        last = max(campaign_calls, key=lambda a: a.attempt_no)
        wait = policy.retry_after.get(last.outcome)
        if wait is not None and last.outcome_at + wait > now:
            return Decision(WAITING_RETRY, not_before=last.outcome_at + wait, calls_in_window=len(calls))
    return Decision(CALL, attempt_no=next_no, calls_in_window=len(calls))
