"""The comparison rules of continuous reconciliation (yindian_common.control_totals):
totals, divergence, the differing serials of a paged listing, and the
persistence window that keeps one crossing answer from raising an alarm."""
from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yindian_common.control_totals import (
    AGREE,
    FLAGGED,
    WATCHING,
    ControlTotals,
    Divergence,
    DivergenceTracker,
    Entry,
    differing_serials,
    divergence,
    totals_of,
)

pytestmark = pytest.mark.timeout(120)

T0 = dt.datetime(2026, 11, 29, 2, 0, tzinfo=dt.UTC)
DAY = dt.date(2026, 11, 29)

entries = st.dictionaries(st.from_regex(r"S[0-9]{1,4}", fullmatch=True),
                          st.builds(Entry, st.integers(1, 10**9), st.booleans()), max_size=40)


def test_totals_count_each_pay_once_by_its_state() -> None:
    t = totals_of([Entry(100, False), Entry(250, False), Entry(40, True)])
    assert t == ControlTotals(posted_count=2, posted_fen=350, reversed_count=1, reversed_fen=40)


def test_a_posted_surplus_cannot_hide_behind_a_reversed_shortfall() -> None:
    ours = ControlTotals(10, 1_000, 2, 200)
    theirs = ControlTotals(10, 1_100, 2, 100)  # net the same: +100 posted, -100 reversed
    assert divergence(ours, theirs) == Divergence(fen=200, count=0)


def test_a_pay_reversed_on_one_side_only_shows_in_fen_and_count() -> None:
    ours = totals_of([Entry(100, False), Entry(200, False)])
    theirs = totals_of([Entry(100, False), Entry(200, True)])
    assert divergence(ours, theirs) == Divergence(fen=400, count=2)


@settings(max_examples=300, deadline=None)
@given(ours=entries, theirs=entries)
def test_divergence_is_zero_exactly_when_totals_agree(ours: dict[str, Entry], theirs: dict[str, Entry]) -> None:
    a, b = totals_of(ours.values()), totals_of(theirs.values())
    d = divergence(a, b)
    assert d.agree == (a == b)
    assert d == divergence(b, a)
    if ours == theirs:
        assert d.agree


@settings(max_examples=300, deadline=None)
@given(ours=entries, theirs=entries, page=st.integers(1, 7))
def test_paging_names_exactly_the_serials_that_differ(ours: dict[str, Entry], theirs: dict[str, Entry],
                                                      page: int) -> None:
    """The bridge pages through the utility's listing; over all pages it finds every serial held by one side
    only or with another amount or state, in order, and no other."""
    listing = sorted(theirs.items())
    found: list[str] = []
    after = ""
    for k in range(0, max(1, len(listing)), page):
        chunk = listing[k:k + page]
        more = k + page < len(listing)
        through = chunk[-1][0] if more else None
        found += differing_serials(ours, chunk, after=after, through=through, limit=1_000)
        if not more:
            break
        after = chunk[-1][0]
    expected = sorted(s for s in ours.keys() | theirs.keys() if ours.get(s) != theirs.get(s))
    assert found == expected


def test_differing_serials_are_bounded() -> None:
    ours = {f"S{i:03d}": Entry(i + 1, False) for i in range(50)}
    assert differing_serials(ours, [], after="", through=None, limit=10) == [f"S{i:03d}" for i in range(10)]


def test_a_divergence_is_flagged_only_once_it_persists_past_the_window() -> None:
    tr = DivergenceTracker(window_s=30)
    d = Divergence(fen=250, count=0)
    v = tr.observe("ICBC", DAY, d, T0)
    assert (v.state, v.gauge_fen) == (WATCHING, 0)
    v = tr.observe("ICBC", DAY, d, T0 + dt.timedelta(seconds=29))
    assert (v.state, v.gauge_fen) == (WATCHING, 0)
    v = tr.observe("ICBC", DAY, d, T0 + dt.timedelta(seconds=30))
    assert (v.state, v.gauge_fen, v.newly_flagged) == (FLAGGED, 250, True)
    v = tr.observe("ICBC", DAY, Divergence(fen=300, count=1), T0 + dt.timedelta(seconds=40))
    assert (v.state, v.gauge_fen, v.gauge_count, v.newly_flagged) == (FLAGGED, 300, 1, False)  # logged once
    v = tr.observe("ICBC", DAY, Divergence(0, 0), T0 + dt.timedelta(seconds=50))
    assert (v.state, v.gauge_fen, v.cleared) == (AGREE, 0, True)


def test_crossing_answers_that_come_and_go_never_raise_an_alarm() -> None:
    """An answer that lands between the two sides' reads shows once, then agrees: the window restarts."""
    tr = DivergenceTracker(window_s=30)
    for k in range(20):
        at = T0 + dt.timedelta(seconds=10 * k)
        d = Divergence(fen=100, count=1) if k % 2 == 0 else Divergence(0, 0)
        assert tr.observe("ICBC", DAY, d, at).gauge_fen == 0


def test_banks_and_days_are_tracked_apart() -> None:
    tr = DivergenceTracker(window_s=30)
    d = Divergence(fen=5, count=0)
    tr.observe("ICBC", DAY, d, T0)
    assert tr.observe("BOC", DAY, d, T0 + dt.timedelta(seconds=40)).state == WATCHING
    assert tr.observe("ICBC", DAY, d, T0 + dt.timedelta(seconds=40)).state == FLAGGED
    # A new settlement date starts over: yesterday's divergence is not today's.
    nxt = DAY + dt.timedelta(days=1)
    assert tr.observe("ICBC", nxt, d, T0 + dt.timedelta(seconds=41)).state == WATCHING


def test_a_reconciled_day_settles_the_alarm() -> None:
    tr = DivergenceTracker(window_s=0)
    assert tr.observe("ICBC", DAY, Divergence(5, 0), T0).state == FLAGGED
    v = tr.settle("ICBC", DAY, T0 + dt.timedelta(seconds=1))
    assert (v.state, v.gauge_fen, v.cleared) == (AGREE, 0, True)
