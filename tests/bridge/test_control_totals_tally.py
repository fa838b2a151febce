"""The bridge's running control totals (bridge.control_totals._Tally, kept by JournalViewCache as journal
facts change) equal the rule walked over every fact (`_view_of`) after any sequence of rows read and
cutoffs, forward or set back: pays posted before, at and after the cutoff, of the settlement date or
another, in doubt, reversed at the utility, cancels in doubt, recent, reversing or not, two cancels of
one pay. Pure Python, no database: many examples."""
from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import journal as jn
from bridge.control_totals import JournalViewCache, _fact, _view_of
from yindian.v1 import billing_pb2 as pb

DAY = dt.date(2026, 11, 28)
AT = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)


def pay_row(n: int, state: str, amount_fen: int, settle_days: int, posted_s: int, reversed_msg: bool) -> tuple:
    body = None
    if state == jn.POSTED:
        resp = pb.PayResponse(bank_serial=f"P{n}", amount_fen=amount_fen,
                              settlement_date=(DAY + dt.timedelta(days=settle_days)).isoformat())
        resp.posted_at.FromDatetime(AT + dt.timedelta(seconds=posted_s))
        body = resp.SerializeToString()
    message = "resolved: reversed at the utility" if reversed_msg else "resolved: refused"
    return (jn.PAY, f"P{n}", state, amount_fen, body, "", message, AT)


def cancel_row(n: int, original: int, state: str, reverses: bool, created_s: int) -> tuple:
    body = None
    if state == jn.CANCELLED:
        body = pb.CancelResponse(outcome=pb.CANCEL_OUTCOME_REVERSED if reverses
                                 else pb.CANCEL_OUTCOME_ORIGINAL_NOT_FOUND).SerializeToString()
    return (jn.CANCEL, f"C{n}", state, 0, body, f"P{original}", None, AT + dt.timedelta(seconds=created_s))


PAY_STATES = [jn.POSTED, jn.POSTED, jn.POSTED, jn.PENDING, jn.SUSPECT, jn.REVERSING, jn.RETRYABLE, jn.FAILED,
              jn.NOT_APPLIED]
CANCEL_STATES = [jn.CANCELLED, jn.CANCELLED, jn.PENDING, jn.SUSPECT, jn.FAILED]
pays = st.builds(pay_row, st.integers(0, 4), st.sampled_from(PAY_STATES), st.integers(1, 9_999),
                 st.sampled_from([0, 0, 0, 1, -1]), st.integers(-6, 6), st.booleans())
cancels = st.builds(cancel_row, st.integers(0, 3), st.integers(0, 4), st.sampled_from(CANCEL_STATES), st.booleans(),
                    st.integers(-6, 6))
views = st.tuples(st.just("view"), st.integers(-6, 6), st.integers(0, 4))
program = st.lists(st.one_of(st.tuples(st.just("row"), st.one_of(pays, cancels)), views), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(program=program)
def test_running_totals_equal_the_rule_over_every_fact(program: list[tuple]) -> None:
    cache = JournalViewCache(None, "ICBC")  # type: ignore[arg-type]  # no reads: rows are fed in
    for op, *args in program:
        if op == "row":
            cache._keep([args[0]])
        else:
            cutoff_s, settle_s = args
            cutoff = AT + dt.timedelta(seconds=cutoff_s)
            settled_before = cutoff - dt.timedelta(seconds=settle_s)
            got = cache._view_of_facts(DAY, cutoff, settled_before)
            want = _view_of(cache._facts.values(), DAY, cutoff, settled_before)
            assert (got.totals, got.in_doubt) == (want.totals, want.in_doubt)
            assert got.entries == want.entries


def test_the_rule_counts_what_a_user_would_expect() -> None:
    """A hand-made day: the amounts the exchange would send."""
    rows = [pay_row(0, jn.POSTED, 100, 0, -3, False), pay_row(1, jn.POSTED, 200, 0, -2, False),
            pay_row(2, jn.POSTED, 400, 0, 5, False),  # posted after the cutoff
            pay_row(3, jn.POSTED, 800, 1, -3, False),  # settles tomorrow
            pay_row(4, jn.SUSPECT, 1_600, 0, 0, False),  # in doubt
            cancel_row(0, 1, jn.CANCELLED, True, -9),  # reverses P1 long before the cutoff
            cancel_row(1, 0, jn.CANCELLED, True, -1)]  # reverses P0, too recently: P0 left out
    cache = JournalViewCache(None, "ICBC")  # type: ignore[arg-type]
    cache._keep(rows)
    view = cache._view_of_facts(DAY, AT, AT - dt.timedelta(seconds=5))
    assert (view.totals.posted_count, view.totals.posted_fen) == (0, 0)
    assert (view.totals.reversed_count, view.totals.reversed_fen) == (1, 200)
    assert view.in_doubt == ["P0", "P4"]
    view = cache._view_of_facts(DAY, AT + dt.timedelta(seconds=6), AT + dt.timedelta(seconds=1))
    assert (view.totals.posted_count, view.totals.posted_fen, view.totals.reversed_fen) == (1, 400, 300)
    assert view.in_doubt == ["P4"]
    assert _fact(*rows[0]).amount_fen == 100
    cache._keep([cancel_row(2, 1, jn.PENDING, False, -9)])  # a second cancel of the reversed P1, in doubt
    view = cache._view_of_facts(DAY, AT + dt.timedelta(seconds=6), AT + dt.timedelta(seconds=1))
    assert (view.totals.posted_count, view.totals.posted_fen, view.totals.reversed_count,
            view.totals.reversed_fen) == (1, 400, 1, 100)  # P1 left out on both sides
    assert view.in_doubt == ["P1", "P4"]
