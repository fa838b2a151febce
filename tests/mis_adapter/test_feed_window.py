"""The feed's window and cursor (mis_adapter.feed_window), as a state machine:
an outbox that grows, streams that deliver, a bank that answers in any
order, repeats itself, or does not re-answer what it answered before, and
streams that end and resume. The model is the store of answers (what the
MIS has committed) and the stored cursor."""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mis_adapter.feed_window import FeedWindow


class FeedWindowMachine(RuleBasedStateMachine):
    @initialize(window_max=st.integers(1, 6))
    def start(self, window_max: int) -> None:
        self.window_max = window_max
        self.outbox = 0                    # last seq issued
        self.answered: set[int] = set()    # seqs with a stored answer (any stream)
        self.stored_cursor = 0
        self.w: FeedWindow[str] = FeedWindow(start_after=0, stored_cursor=0, window_max=window_max)

    def _commit(self, seqs: set[int]) -> None:
        """What the edge does: store answers and the cursor together, then accept."""
        new = {s for s in seqs if s in self.w.outstanding}
        to = self.w.cursor_after(new)
        assert all(s in self.answered or s in new for s in range(1, to + 1)), "cursor passes an unanswered seq"
        self.answered |= new
        self.stored_cursor = max(self.stored_cursor, to)
        self.w.accept(new)

    @rule(n=st.integers(1, 4))
    def issue(self, n: int) -> None:
        self.outbox += n

    @rule(n=st.integers(1, 4))
    def deliver(self, n: int) -> None:
        k = min(n, self.w.space(), self.outbox - self.w.sent)
        seqs = list(range(self.w.sent + 1, self.w.sent + 1 + k))
        looked_up = set(self.w.to_look_up(seqs))
        # The edge looks up only what the window asks about: it must be enough.
        assert {s for s in seqs if s in self.answered and s > self.w.cursor} <= looked_up
        self.w.offer([(s, f"notice {s}") for s in seqs], answered=looked_up & self.answered)
        if k:
            self._commit(set())   # already-answered redeliveries may complete the cursor

    @precondition(lambda self: bool(self.w.outstanding))
    @rule(data=st.data())
    def answer_some(self, data: st.DataObject) -> None:
        out = sorted(self.w.outstanding)
        picked = data.draw(st.sets(st.sampled_from(out), min_size=1))
        self._commit(picked)

    @rule(seq=st.integers(0, 30))
    def duplicate_changes_nothing(self, seq: int) -> None:
        if seq in self.w.outstanding:
            return
        before = (self.w.cursor, self.w.sent, dict(self.w.outstanding), self.w.space())
        assert self.w.accept({seq}) == 0
        assert (self.w.cursor, self.w.sent, dict(self.w.outstanding), self.w.space()) == before

    @rule(resume=st.integers(0, 30))
    def reconnect(self, resume: int) -> None:
        """A new stream: from the bank's resume point, clamped to the stored cursor."""
        start = min(resume, self.stored_cursor)
        high = max(self.answered, default=0)
        self.w = FeedWindow(start_after=start, stored_cursor=self.stored_cursor, window_max=self.window_max,
                            answered_high=high)

    @invariant()
    def cursor_never_passes_an_unanswered_seq(self) -> None:
        assert all(s in self.answered for s in range(1, self.stored_cursor + 1))
        assert self.w.cursor == self.stored_cursor == self.w.cursor_after(set())

    @invariant()
    def never_more_than_the_window_outstanding(self) -> None:
        assert len(self.w.outstanding) <= self.window_max
        assert self.w.sent - self.w.acked() <= self.window_max
        assert self.w.space() >= 0

    @invariant()
    def an_answered_seq_is_never_waited_for(self) -> None:
        assert not set(self.w.outstanding) & self.answered

    @invariant()
    def all_answered_means_cursor_caught_up(self) -> None:
        if not self.w.outstanding and self.w.sent >= self.stored_cursor:
            assert self.stored_cursor == self.w.sent


FeedWindowMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_feed_window = FeedWindowMachine.TestCase


def test_redelivered_answered_notice_does_not_stall() -> None:
    # Stream 1 delivered 1..3; the bank answered 2 and 3 but not 1: cursor 0.
    w: FeedWindow[str] = FeedWindow(start_after=0, stored_cursor=0, window_max=3, answered_high=3)
    w.offer([(1, "a"), (2, "b"), (3, "c")], answered={2, 3})
    assert list(w.outstanding) == [1] and w.cursor_after(set()) == 0
    assert w.accept({1}) == 3 and w.cursor == 3 and w.space() == 3


def test_offer_refuses_a_gap_and_an_overfull_window() -> None:
    import pytest

    w: FeedWindow[str] = FeedWindow(start_after=0, stored_cursor=0, window_max=2)
    with pytest.raises(ValueError, match="gapless"):
        w.offer([(2, "x")])
    with pytest.raises(ValueError, match="room"):
        w.offer([(1, "a"), (2, "b"), (3, "c")])
    with pytest.raises(ValueError, match="skipped"):
        FeedWindow(start_after=5, stored_cursor=4, window_max=2)
