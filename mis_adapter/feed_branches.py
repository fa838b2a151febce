"""Where a bill feed stream reads and writes (mis_adapter.feed_service asks
a FeedStore): one database (`OneDatabaseFeed`, the feed as it always was), or
branch databases merged at the front (`BranchFeed`).

Across branches (DESIGN.md Money semantics 7, with --branch-db):
- Each branch database keeps issuing into its own outbox with its own gapless
  per-bank seq (mis_adapter.issue_bills, unchanged). The front database
  numbers them into one gapless sequence per bank: a merge takes, in one
  front transaction holding the bank's head row, the next notices of every
  branch outbox past what was merged (`front_feed_heads`) and maps each to
  the next global seq (`front_feed_map`). A branch outbox only grows in seq
  order as its transactions commit, so nothing is ever merged out of order
  or twice, and a global seq, once handed out, always names the same notice.
- The bank sees global seqs only. A result is stored, with its money
  effects, in the bill's own branch under the notice's local seq
  (mis_adapter.feed.apply_results, one transaction per branch); then the
  global cursor (the front's feed_cursors row) advances over the contiguous
  global seqs whose results are stored. A crash between the two redelivers
  those notices, whose stored results make them duplicates: nothing lost,
  nothing applied twice.
- DEBITED serials are claimed in the front registry before a branch posts
  them, so the auto-debit serial space is the bank's one serial space.
- The lease (one stream per bank) is the front database's feed_leases row;
  wake-ups poll (`poll_interval_s`): the issuers notify their own databases.
Nothing here speaks gRPC."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mis_adapter import agreements, feed, payments, registry
from mis_adapter.db.base import table_of
from mis_adapter.db.feed import OutboxRow
from mis_adapter.db.front import FrontFeedHead, FrontFeedNotice
from mis_adapter.feed import DebitIn, Notice
from mis_adapter.registry import Claim
from mis_adapter.routing import BranchRouter
from yindian_common.errors import SerialConflict

MERGE_BATCH_MAX = 5_000      # notices taken from one branch outbox per merge step
LAST_SEQ_HOME = "**"         # the head row holding the last global seq (the row a merge locks)

T_MAP = table_of(FrontFeedNotice)
T_HEAD = table_of(FrontFeedHead)
T_OUT = table_of(OutboxRow)
_b = sa.bindparam
_HEADS = sa.select(T_HEAD.c.home, T_HEAD.c.merged_through).where(T_HEAD.c.bank_id == _b("bank_id"))
_LOCK_LAST = (sa.select(T_HEAD.c.merged_through)
              .where(T_HEAD.c.bank_id == _b("bank_id"), T_HEAD.c.home == LAST_SEQ_HOME).with_for_update())
_SET_HEAD = (T_HEAD.update().where(T_HEAD.c.bank_id == _b("p_bank"), T_HEAD.c.home == _b("p_home"))
             .values(merged_through=_b("p_through")))
_OUTBOX_AFTER = (sa.select(T_OUT.c.seq).where(T_OUT.c.bank_id == _b("bank_id"), T_OUT.c.seq > _b("after"))
                 .order_by(T_OUT.c.seq).limit(_b("limit")))
_MAP_AFTER = (sa.select(T_MAP.c.seq, T_MAP.c.home, T_MAP.c.local_seq)
              .where(T_MAP.c.bank_id == _b("bank_id"), T_MAP.c.seq > _b("after")).order_by(T_MAP.c.seq)
              .limit(_b("limit")))
_MAP_SEQS = (sa.select(T_MAP.c.seq, T_MAP.c.home, T_MAP.c.local_seq)
             .where(T_MAP.c.bank_id == _b("bank_id"), T_MAP.c.seq.in_(_b("seqs", expanding=True))))
_GLOBAL_OF_LOCAL_HIGH = (sa.select(sa.func.max(T_MAP.c.seq))
                         .where(T_MAP.c.bank_id == _b("bank_id"), T_MAP.c.home == _b("home"),
                                T_MAP.c.local_seq <= _b("local")))


class FeedStore(Protocol):
    lease_engine: Engine
    listens: bool  # PostgreSQL NOTIFY on lease_engine wakes the streams

    def cursor(self, bank_id: str) -> int: ...
    def answered_high(self, bank_id: str) -> int: ...
    def read_notices(self, bank_id: str, after_seq: int, limit: int) -> list[Notice]: ...
    def stored_results(self, bank_id: str, seqs: Sequence[int]) -> dict[int, tuple[str, str, int]]: ...
    def apply(self, bank_id: str, results: Sequence[DebitIn], cursor_to: int) -> None: ...
    def withdrawn_among(self, bank_id: str, seqs: Sequence[int]) -> set[int]: ...


def store_for(books: Any) -> FeedStore:
    return BranchFeed(books) if books.router.split else OneDatabaseFeed(books)


class OneDatabaseFeed:
    """All branches in one database: mis_adapter.feed as it is."""

    def __init__(self, books: Any) -> None:
        self.books = books
        self.lease_engine: Engine = books.router.primary
        self.listens = True

    def cursor(self, bank_id: str) -> int:
        with feed.reading(self.lease_engine) as conn:
            return feed.get_cursor(conn, bank_id)

    def answered_high(self, bank_id: str) -> int:
        with feed.reading(self.lease_engine) as conn:
            return feed.answered_high(conn, bank_id)

    def read_notices(self, bank_id: str, after_seq: int, limit: int) -> list[Notice]:
        with feed.reading(self.lease_engine) as conn:
            return feed.read_notices(conn, bank_id, after_seq, limit)

    def stored_results(self, bank_id: str, seqs: Sequence[int]) -> dict[int, tuple[str, str, int]]:
        with feed.reading(self.lease_engine) as conn:
            return feed.stored_results(conn, bank_id, seqs)

    def apply(self, bank_id: str, results: Sequence[DebitIn], cursor_to: int) -> None:
        feed.apply_results(self.books, bank_id, results, cursor_to)

    def withdrawn_among(self, bank_id: str, seqs: Sequence[int]) -> set[int]:
        with feed.reading(self.lease_engine) as conn:
            return agreements.withdrawn_among(conn, bank_id, seqs)


@dataclass(frozen=True)
class _OneRouter:
    primary: Engine


@dataclass(frozen=True)
class _BranchBooks:
    """payments.Books over one branch database (feed.apply_results writes in router.primary)."""
    router: _OneRouter
    clock: Any
    rates: Any
    settings: Any


class BranchFeed:
    def __init__(self, books: Any) -> None:
        router: BranchRouter = books.router
        if router.front is None:
            raise RuntimeError("BranchFeed needs a front database")
        self.books = books
        self.front: Engine = router.front
        self.lease_engine = self.front
        self.listens = False
        self._homes = dict(router.database_keys())
        self._home_of = {engine: key for key, engine in self._homes.items()}
        self._router = router

    # -- the global sequence --
    def merge(self, bank_id: str, per_branch_max: int = MERGE_BATCH_MAX) -> int:
        """Numbers the branches' new notices into the global sequence; returns the last global seq."""
        with self.front.begin() as conn:
            last = self._lock_last(conn, bank_id)
            heads = {r.home: int(r.merged_through) for r in conn.execute(_HEADS, {"bank_id": bank_id})}
            for home, engine in self._homes.items():
                done = heads.get(home)
                with feed.reading(engine) as bconn:
                    new = [int(r.seq) for r in bconn.execute(_OUTBOX_AFTER, {"bank_id": bank_id, "after": done or 0,
                                                                              "limit": per_branch_max})]
                if not new:
                    continue
                if new != list(range(new[0], new[0] + len(new))) or new[0] != (done or 0) + 1:
                    raise RuntimeError(f"outbox of {bank_id} in database {home!r} has a gap after {done}")
                feed.bulk_insert(conn, T_MAP, [{"bank_id": bank_id, "seq": last + 1 + i, "home": home,
                                                "local_seq": local} for i, local in enumerate(new)])
                last += len(new)
                self._set_head(conn, bank_id, home, new[-1], exists=done is not None)
            conn.execute(_SET_HEAD, {"p_bank": bank_id, "p_home": LAST_SEQ_HOME, "p_through": last})
        return last

    def _lock_last(self, conn: Connection, bank_id: str) -> int:
        row = conn.execute(_LOCK_LAST, {"bank_id": bank_id}).first()
        if row is None:
            feed._insert_ignore(conn, T_HEAD, {"bank_id": bank_id, "home": LAST_SEQ_HOME, "merged_through": 0})
            row = conn.execute(_LOCK_LAST, {"bank_id": bank_id}).one()
        return int(row.merged_through)

    def _set_head(self, conn: Connection, bank_id: str, home: str, through: int, *, exists: bool) -> None:
        if exists:
            conn.execute(_SET_HEAD, {"p_bank": bank_id, "p_home": home, "p_through": through})
        else:
            conn.execute(T_HEAD.insert(), {"bank_id": bank_id, "home": home, "merged_through": through})

    def _map(self, bank_id: str, seqs: Sequence[int]) -> dict[int, tuple[str, int]]:
        if not seqs:
            return {}
        with feed.reading(self.front) as conn:
            return {int(r.seq): (r.home, int(r.local_seq))
                    for r in conn.execute(_MAP_SEQS, {"bank_id": bank_id, "seqs": list(seqs)})}

    # -- FeedStore --
    def cursor(self, bank_id: str) -> int:
        with feed.reading(self.front) as conn:
            return feed.get_cursor(conn, bank_id)

    def answered_high(self, bank_id: str) -> int:
        high = 0
        for home, engine in self._homes.items():
            with feed.reading(engine) as conn:
                local = feed.answered_high(conn, bank_id)
            if local:
                with feed.reading(self.front) as conn:
                    high = max(high, int(conn.execute(_GLOBAL_OF_LOCAL_HIGH, {"bank_id": bank_id, "home": home,
                                                                             "local": local}).scalar() or 0))
        return high

    def read_notices(self, bank_id: str, after_seq: int, limit: int) -> list[Notice]:
        with feed.reading(self.front) as conn:
            rows = conn.execute(_MAP_AFTER, {"bank_id": bank_id, "after": after_seq, "limit": limit}).all()
        if len(rows) < limit:
            self.merge(bank_id)
            with feed.reading(self.front) as conn:
                rows = conn.execute(_MAP_AFTER, {"bank_id": bank_id, "after": after_seq, "limit": limit}).all()
        by_home: dict[str, list[tuple[int, int]]] = {}
        for i, r in enumerate(rows):
            if r.seq != after_seq + 1 + i:
                raise RuntimeError(f"global feed sequence of {bank_id} has a gap before seq {r.seq}")
            by_home.setdefault(r.home, []).append((int(r.seq), int(r.local_seq)))
        out: list[Notice] = []
        for home, pairs in by_home.items():
            first_local = pairs[0][1]
            with feed.reading(self._homes[home]) as conn:
                local = feed.read_notices(conn, bank_id, first_local - 1, len(pairs))
            if [n.seq for n in local] != [p[1] for p in pairs]:
                raise RuntimeError(f"outbox of {bank_id} in database {home!r} lost merged notices")
            out += [n._replace(seq=g) for n, (g, _l) in zip(local, pairs, strict=True)]
        return sorted(out, key=lambda n: n.seq)

    def stored_results(self, bank_id: str, seqs: Sequence[int]) -> dict[int, tuple[str, str, int]]:
        out: dict[int, tuple[str, str, int]] = {}
        by_home: dict[str, dict[int, int]] = {}
        for g, (home, local) in self._map(bank_id, seqs).items():
            by_home.setdefault(home, {})[local] = g
        for home, locals_ in by_home.items():
            with feed.reading(self._homes[home]) as conn:
                for local, res in feed.stored_results(conn, bank_id, sorted(locals_)).items():
                    out[locals_[local]] = res
        return out

    def withdrawn_among(self, bank_id: str, seqs: Sequence[int]) -> set[int]:
        """Withdrawn notices (their agreement ended) are recorded by local seq in their own branch."""
        out: set[int] = set()
        by_home: dict[str, dict[int, int]] = {}
        for g, (home, local) in self._map(bank_id, seqs).items():
            by_home.setdefault(home, {})[local] = g
        for home, locals_ in by_home.items():
            with feed.reading(self._homes[home]) as conn:
                out |= {locals_[s] for s in agreements.withdrawn_among(conn, bank_id, sorted(locals_))}
        return out

    def apply(self, bank_id: str, results: Sequence[DebitIn], cursor_to: int) -> None:
        mapped = self._map(bank_id, [r.seq for r in results])
        claimed = self._claim_debits(bank_id, results)
        by_home: dict[str, list[DebitIn]] = {}
        for r in results:
            home, local = mapped[r.seq]
            by_home.setdefault(home, []).append(r._replace(seq=local))
        for home, local_results in by_home.items():
            view = _BranchBooks(_OneRouter(self._homes[home]), self.books.clock, self.books.rates,
                                self.books.settings)
            # the branch's own feed cursor is not used: the global one is the front's
            feed.apply_results(cast(payments.Books, view), bank_id, local_results, 0)
        now = self.books.clock.now().astimezone(dt.UTC)
        registry.settle_many(self.front, bank_id, claimed, now)
        if cursor_to > 0:
            with self.front.begin() as conn:
                feed._advance_cursor(conn, bank_id, cursor_to, now)

    def _claim_debits(self, bank_id: str, results: Sequence[DebitIn]) -> list[str]:
        """The debits' serials in the bank's one serial space, claimed in one front transaction;
        a serial held elsewhere (another account or amount, a tombstone) refuses the batch."""
        debits = [r for r in results if r.outcome == feed.DEBITED]
        if not debits:
            return []
        now = self.books.clock.now().astimezone(dt.UTC)
        wants = [Claim(bank_id, r.bank_serial, registry.PAY, r.account_no[:2], r.account_no, r.amount_fen,
                       registry.CLAIMED) for r in debits]
        claims = registry.claim_many(self.front, bank_id, wants, now)
        for r in debits:
            claim = claims[r.bank_serial]
            if (claim.kind != registry.PAY or claim.account_no != r.account_no
                    or claim.amount_fen != r.amount_fen):
                raise SerialConflict(f"bank_serial {r.bank_serial} of feed seq {r.seq} was used for another payment",
                                     reason="SERIAL_REUSED")
        return [r.bank_serial for r in debits if claims[r.bank_serial].state == registry.CLAIMED]
