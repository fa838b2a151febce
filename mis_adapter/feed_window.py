"""The bill feed's window and cursor for one stream, pure (DESIGN.md Money
semantics 7). The edge (mis_adapter.feed_service) holds one per stream and
does the I/O; this object only decides.

- `offer` takes the next notices, in seq order, never more than `space()`.
  A notice already answered (on an earlier stream, or at or below the
  stored cursor) is not waited for: redelivering it costs the bank nothing
  and the cursor does not stall on a bank that does not answer it again.
- `cursor_after(seqs)` is the contiguous acknowledgement point if `seqs`
  were answered now: the edge stores those answers and that cursor in one
  transaction, then calls `accept(seqs)`. The cursor never passes a seq
  that is delivered and unanswered.
- Answers for seqs that are not outstanding (duplicates) change nothing.

Seqs in (stored cursor, answered high] may have a stored answer: the edge
looks those up (`to_look_up`) and passes the answered ones to `offer`.
Seqs above the answered high point at the stream's start can only be
answered on this stream, so the steady state needs no look-up.
Not thread-safe: the edge guards it with its own lock."""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["FeedWindow"]


class FeedWindow(Generic[T]):
    def __init__(self, *, start_after: int, stored_cursor: int, window_max: int, answered_high: int = 0) -> None:
        if window_max < 1:
            raise ValueError("window_max must be positive")
        if start_after < 0 or stored_cursor < 0:
            raise ValueError("seqs are not negative")
        if start_after > stored_cursor:
            raise ValueError("a stream never starts after the stored cursor (a notice would be skipped)")
        self.window_max = window_max
        self.sent = start_after          # the highest seq offered on this stream
        self.cursor = stored_cursor      # every seq at or below it has a stored answer
        self._known_answered = stored_cursor
        self._answered_high = max(answered_high, stored_cursor)
        self._out: dict[int, T] = {}     # delivered, unanswered; insertion (= seq) order

    # ---- what is outstanding ----
    @property
    def outstanding(self) -> Mapping[int, T]:
        return self._out

    def acked(self) -> int:
        """The contiguous answered point on this stream (the cursor once stored)."""
        return next(iter(self._out)) - 1 if self._out else self.sent

    def space(self) -> int:
        """How many more notices may be offered now."""
        return self.window_max - (self.sent - self.acked())

    def delivered(self, seq: int) -> bool:
        return 0 < seq <= self.sent

    # ---- offering ----
    def to_look_up(self, seqs: Iterable[int]) -> list[int]:
        """Which of these seqs may have an answer stored on an earlier stream."""
        return [s for s in seqs if self._known_answered < s <= self._answered_high]

    def offer(self, items: Sequence[tuple[int, T]], answered: Collection[int] = ()) -> None:
        """Offers the next notices (seq, payload), consecutive after `sent`.
        `answered`: those of them that already have a stored answer."""
        if len(items) > self.space():
            raise ValueError(f"offering {len(items)} notices with room for {self.space()}")
        for i, (seq, _payload) in enumerate(items):
            if seq != self.sent + 1 + i:
                raise ValueError(f"notice seq {seq} offered after {self.sent + i}: seqs are gapless")
        for seq, payload in items:
            self.sent = seq
            if seq > self._known_answered and seq not in answered:
                self._out[seq] = payload

    # ---- answering ----
    def cursor_after(self, seqs: Collection[int]) -> int:
        """The cursor once `seqs` are answered (seqs not outstanding change nothing)."""
        for seq in self._out:
            if seq not in seqs:
                return max(self.cursor, seq - 1)
        return max(self.cursor, self.sent)

    def accept(self, seqs: Collection[int]) -> int:
        """Marks `seqs` answered (after their answers and `cursor_after(seqs)`
        are stored); returns how far the cursor advanced."""
        to = self.cursor_after(seqs)
        for seq in seqs:
            self._out.pop(seq, None)
        advanced, self.cursor = to - self.cursor, to
        return advanced
