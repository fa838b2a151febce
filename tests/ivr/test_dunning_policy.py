"""The dunning policy as a pure function: quiet hours at their edges, the
rolling 7-in-7 cap, the retry schedule and opt-outs."""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from ivr.accounts import Attempt
from ivr.dunning import (
    CALL,
    CAPPED,
    OPT_OUT,
    OPT_OUT_RECORDED,
    REACHED,
    WAITING_RETRY,
    DunningPolicy,
    decide,
    in_quiet_hours,
    quiet_hours_end,
)

pytestmark = pytest.mark.timeout(30)
SH = ZoneInfo("Asia/Shanghai")
POLICY = DunningPolicy(tz=SH)
NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=SH)


def at(hh: int, mm: int, day: int = 28) -> dt.datetime:
    return dt.datetime(2026, 11, day, hh, mm, tzinfo=SH)


@pytest.mark.parametrize(("when", "quiet"), [
    (at(20, 59), False), (at(21, 0), True), (at(23, 59), True), (at(0, 0), True), (at(7, 59), True),
    (at(8, 0), False), (at(12, 0), False),
    (dt.datetime(2026, 11, 28, 13, 30, tzinfo=dt.UTC), True),    # 21:30 in Shanghai
    (dt.datetime(2026, 11, 28, 0, 30, tzinfo=dt.UTC), False),    # 08:30 in Shanghai
])
def test_quiet_hours_in_the_utility_time_zone(when: dt.datetime, quiet: bool) -> None:
    assert in_quiet_hours(when, POLICY) is quiet


def test_quiet_hours_end_is_the_next_eight_oclock() -> None:
    assert quiet_hours_end(at(22, 0), POLICY) == at(8, 0, day=29)
    assert quiet_hours_end(at(1, 0, day=29), POLICY) == at(8, 0, day=29)
    assert quiet_hours_end(at(9, 0), POLICY) == at(9, 0)


def attempt(no: int, outcome: str, placed: dt.datetime, campaign: str = "C") -> Attempt:
    return Attempt(campaign, "0100000017", no, outcome, placed, placed)


def test_cap_counts_calls_in_the_rolling_window_of_any_campaign() -> None:
    calls = [attempt(i + 1, "NO_ANSWER", NOW - dt.timedelta(days=6, hours=i), campaign=f"C{i % 2}")
             for i in range(7)]
    d = decide(campaign_id="C0", opted_out=False, window_attempts=calls, campaign_attempts=calls[::2], now=NOW,
               policy=POLICY)
    assert d.action == CAPPED and d.calls_in_window == 7
    assert d.not_before == min(a.placed_at for a in calls) + dt.timedelta(days=7)
    skipped = calls[:6] + [attempt(7, "SKIPPED_PAID", NOW - dt.timedelta(hours=5))]
    assert decide(campaign_id="C0", opted_out=False, window_attempts=skipped, campaign_attempts=[], now=NOW,
                  policy=POLICY).action == CALL   # a skip is not a call


@pytest.mark.parametrize(("outcome", "wait"), [("NO_ANSWER", dt.timedelta(hours=2)),
                                               ("BUSY", dt.timedelta(minutes=30)),
                                               ("FAILED", dt.timedelta(hours=4)),
                                               ("PLACED", dt.timedelta(hours=1))])
def test_retry_waits_by_outcome(outcome: str, wait: dt.timedelta) -> None:
    last = [attempt(1, outcome, NOW)]
    early = decide(campaign_id="C", opted_out=False, window_attempts=last, campaign_attempts=last,
                   now=NOW + wait - dt.timedelta(seconds=1), policy=POLICY)
    assert early.action == WAITING_RETRY and early.not_before == NOW + wait
    due = decide(campaign_id="C", opted_out=False, window_attempts=last, campaign_attempts=last, now=NOW + wait,
                 policy=POLICY)
    assert (due.action, due.attempt_no) == (CALL, 2)


def test_answered_and_opted_out_households_are_not_called() -> None:
    answered = [attempt(1, "ANSWERED", NOW - dt.timedelta(days=1))]
    assert decide(campaign_id="C", opted_out=False, window_attempts=answered, campaign_attempts=answered, now=NOW,
                  policy=POLICY).action == REACHED
    first = decide(campaign_id="C", opted_out=True, window_attempts=answered, campaign_attempts=answered, now=NOW,
                   policy=POLICY)
    assert (first.action, first.attempt_no) == (OPT_OUT, 2)
    skipped = answered + [attempt(2, "SKIPPED_OPT_OUT", NOW)]
    assert decide(campaign_id="C", opted_out=True, window_attempts=skipped, campaign_attempts=skipped, now=NOW,
                  policy=POLICY).action == OPT_OUT_RECORDED


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        DunningPolicy(tz=SH, attempts_max=0)
    with pytest.raises(ValueError):
        DunningPolicy(tz=SH, quiet_start=dt.time(8), quiet_end=dt.time(8))
