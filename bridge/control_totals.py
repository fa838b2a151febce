"""The bank's side of continuous reconciliation (yindian_common.control_totals).

Every `control_totals_interval_s` a background thread totals the bank's pays
of the open settlement date from the journal's definite outcomes, sends the
totals (with the serials still in doubt, left out on both sides) to the
utility (ExchangeControlTotals), compares the utility's answer with its own,
and keeps `yindian_control_total_divergence_fen` on this bridge's /metrics.
Once a divergence has persisted past `control_totals_window_s` it pages
through the utility's per-serial entries (bounded) and logs the first
differing serials, once; the next exchange passes them on for the
utility's log.

From the journal (read only; the writer and the resolver are untouched):
- a POSTED pay counts with the settlement date and `posted_at` of the
  utility's stored answer; reversed when a cancel of it was answered
  REVERSED;
- a NOT_APPLIED pay that the utility had posted and reversed (resolved
  "reversed at the utility", or the bridge's own reversal answered
  REVERSED) is left out on both sides like an in-doubt one: the journal
  never saw its posting, so it does not know its settlement date (a pay
  after the utility's sign-off settles the next day); these are few (pays
  whose answer was lost), and the daily reconciliation covers them;
- a pay PENDING, SUSPECT, REVERSING or RETRYABLE, and the original of a
  cancel PENDING or SUSPECT, are in doubt; so is the original of a cancel
  journaled within `settle_s` before the cutoff (the utility counts a
  reversal only once it is older than the cutoff, and the journal does not
  know exactly when the utility applied it).
What it must never do: write to the journal, or alarm on a single
exchange."""
from __future__ import annotations

import datetime as dt
import heapq
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Engine

from bridge import journal as jn
from bridge.upstream import Upstream
from yindian.v1 import billing_pb2 as pb
from yindian_common import business_metrics
from yindian_common.clock import Clock, business_date, utc_now
from yindian_common.control_totals import (
    AGREE,
    ControlTotals,
    DivergenceTracker,
    Entry,
    Verdict,
    differing_serials,
    divergence,
    totals_of,
)

__all__ = ["ControlTotalsExchanger", "ExchangeLimits", "JournalView", "JournalViewCache", "journal_view"]

log = logging.getLogger("yindian.bridge.control_totals")

PAY_IN_DOUBT = frozenset({jn.PENDING, jn.SUSPECT, jn.REVERSING, jn.RETRYABLE})
CANCEL_IN_DOUBT = frozenset({jn.PENDING, jn.SUSPECT})
_j = jn.requests.c
_ROWS = sa.select(_j.kind, _j.serial, _j.state, _j.amount_fen, _j.body, _j.original_serial, _j.message,
                  _j.created_at)


@dataclass(frozen=True)
class JournalView:
    """What an exchange sends: the totals and the serials in doubt. `entries` (each pay counted, by serial)
    is listed only when asked for (paging through the utility's entries after a divergence): the cache
    keeps the totals as they change instead of walking every pay of the day at each exchange."""
    totals: ControlTotals
    in_doubt: list[str]
    list_entries: Callable[[], dict[str, Entry]] = field(compare=False, repr=False)

    @property
    def entries(self) -> dict[str, Entry]:
        return self.list_entries()


def _reversed_by_utility(message: str) -> bool:
    """A NOT_APPLIED pay's resolution says the utility had posted, then reversed it."""
    return "reversed" in message.lower()


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite and MariaDB hand back naive datetimes; the journal stores UTC instants.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class _Fact(NamedTuple):
    """What one journal row contributes, parsed once (a definite row's never changes); whether it counts
    as of a cutoff is decided at each exchange (`_Tally`, held equal to the rule `_entries_of`), so the
    same fact serves every exchange. Atoms only (no object per pay besides the tuple)."""
    kind: str
    serial: str
    state: str
    doubt: bool  # a pay in doubt whatever the cutoff; a cancel whose original is
    amount_fen: int  # a POSTED pay's (0 otherwise)
    settlement_date: str  # a POSTED pay's, from the utility's answer ("" otherwise)
    posted_at_us: int  # a POSTED pay's `posted_at`, microseconds since the epoch (0 otherwise)
    original: str
    created_at: dt.datetime | None  # a cancel's
    reverses: bool  # a CANCELLED cancel answered REVERSED


_STATES = {s: s for s in (jn.PENDING, jn.POSTED, jn.CANCELLED, jn.FAILED, jn.RETRYABLE, jn.SUSPECT, jn.REVERSING,
                           jn.NOT_APPLIED)}


def _fact(kind: str, serial: str, state: str, amount_fen: int, body: bytes | None, original: str,
          message: str | None, created_at: dt.datetime) -> _Fact:
    # The cache holds one fact per row of two days: states and settlement dates shared, not one string per row,
    # and a pay keeps no journaling instant (only a cancel's counts).
    state = _STATES.get(state, state)
    if kind == jn.PAY:
        kind = jn.PAY
        if state in PAY_IN_DOUBT or (state == jn.NOT_APPLIED and _reversed_by_utility(message or "")):
            return _Fact(kind, serial, state, True, 0, "", 0, original, None, False)
        if state == jn.POSTED:
            resp = pb.PayResponse.FromString(body or b"")
            at = resp.posted_at  # compared in whole microseconds, as Timestamp.ToDatetime truncates (3 us a row)
            return _Fact(kind, serial, state, False, int(amount_fen), sys.intern(resp.settlement_date),
                         at.seconds * 1_000_000 + at.nanos // 1_000, original, None, False)
        return _Fact(kind, serial, state, False, 0, "", 0, original, None, False)
    created = _utc(created_at)
    if state in CANCEL_IN_DOUBT:
        return _Fact(kind, serial, state, True, 0, "", 0, original, created, False)
    reverses = state == jn.CANCELLED and \
        pb.CancelResponse.FromString(body or b"").outcome == pb.CANCEL_OUTCOME_REVERSED
    return _Fact(kind, serial, state, False, 0, "", 0, original, created, reverses)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US = dt.timedelta(microseconds=1)


def _us(at: dt.datetime) -> int:
    return (_utc(at) - _EPOCH) // _US


def _view_of(facts: Iterable[_Fact], day: dt.date, posted_before: dt.datetime,
             settled_before: dt.datetime) -> JournalView:
    """The view by the rule, walking every fact (the reference the cache's running totals are held to)."""
    entries, in_doubt = _entries_of(facts, day, posted_before, settled_before)
    return JournalView(totals_of(entries.values()), in_doubt, lambda: entries)


def _entries_of(facts: Iterable[_Fact], day: dt.date, posted_before: dt.datetime,
                settled_before: dt.datetime) -> tuple[dict[str, Entry], list[str]]:
    entries: dict[str, Entry] = {}
    in_doubt: set[str] = set()
    reversed_serials: set[str] = set()
    iso_day = day.isoformat()
    pay = jn.PAY
    before_us = _us(posted_before)
    for f in facts:
        if f.kind == pay:
            if f.doubt:
                in_doubt.add(f.serial)
            elif f.settlement_date == iso_day and f.posted_at_us < before_us:
                entries[f.serial] = Entry(f.amount_fen, False)
        elif f.doubt or f.created_at >= settled_before:  # type: ignore[operator]
            in_doubt.add(f.original)
        elif f.reverses:
            reversed_serials.add(f.original)
    for serial in reversed_serials & entries.keys():
        entries[serial] = Entry(entries[serial].amount_fen, True)
    for serial in in_doubt:
        entries.pop(serial, None)
    return entries, sorted(in_doubt)


class _Tally:
    """The control totals of one settlement date kept as the cache's facts change, so that an exchange
    costs what changed since the last one, not the day's pays: the POSTED pays of the date posted before
    the last cutoff are counted once (`counted`, with their sums); those posted later wait in a heap by
    `posted_at` until the cutoff passes them. Pays in doubt and cancels (few) are kept apart and applied
    at each exchange as `_entries_of` applies them. The cutoff only moves forward; a cutoff earlier than
    the last one (a clock set back) or another date starts the tally over from the facts."""

    def __init__(self, day: str) -> None:
        self.day = day
        self.before_us = -(2**63)
        self.counted: dict[str, int] = {}  # serial -> amount_fen
        self.count = 0
        self.fen = 0
        self.waiting: list[tuple[int, str]] = []  # (posted_at_us, serial), a heap
        self.doubt: set[str] = set()  # pays in doubt
        self.cancels: dict[str, _Fact] = {}  # by the cancel's serial

    def add(self, f: _Fact) -> None:
        if f.kind != jn.PAY:
            self.cancels[f.serial] = f
        elif f.doubt:
            self.doubt.add(f.serial)
        elif f.state == jn.POSTED and f.settlement_date == self.day:
            if f.posted_at_us < self.before_us:
                self._count(f.serial, f.amount_fen)
            else:
                heapq.heappush(self.waiting, (f.posted_at_us, f.serial))

    def remove(self, f: _Fact) -> None:
        """Before a row's fact is replaced (a waiting pay is checked against the facts when it comes due)."""
        if f.kind != jn.PAY:
            self.cancels.pop(f.serial, None)
            return
        self.doubt.discard(f.serial)
        amount = self.counted.pop(f.serial, None)
        if amount is not None:
            self.count -= 1
            self.fen -= amount

    def _count(self, serial: str, amount_fen: int) -> None:
        if serial not in self.counted:
            self.counted[serial] = amount_fen
            self.count += 1
            self.fen += amount_fen

    def advance(self, before_us: int, facts: dict[tuple[str, str], _Fact]) -> None:
        self.before_us = before_us
        waiting = self.waiting
        while waiting and waiting[0][0] < before_us:
            at, serial = heapq.heappop(waiting)
            f = facts.get((jn.PAY, serial))
            if (f is not None and f.state == jn.POSTED and not f.doubt and f.posted_at_us == at
                    and f.settlement_date == self.day):
                self._count(serial, f.amount_fen)

    def totals(self, settled_before: dt.datetime) -> tuple[ControlTotals, list[str]]:
        in_doubt = set(self.doubt)
        reversed_serials: set[str] = set()
        for c in self.cancels.values():
            if c.doubt or c.created_at >= settled_before:  # type: ignore[operator]
                in_doubt.add(c.original)
            elif c.reverses:
                reversed_serials.add(c.original)
        posted_count, posted_fen, reversed_count, reversed_fen = self.count, self.fen, 0, 0
        for serial in in_doubt:
            amount = self.counted.get(serial)
            if amount is not None:
                posted_count, posted_fen = posted_count - 1, posted_fen - amount
        for serial in reversed_serials - in_doubt:
            amount = self.counted.get(serial)
            if amount is not None:
                posted_count, posted_fen = posted_count - 1, posted_fen - amount
                reversed_count, reversed_fen = reversed_count + 1, reversed_fen + amount
        return ControlTotals(posted_count, posted_fen, reversed_count, reversed_fen), sorted(in_doubt)


def _days(day: dt.date) -> sa.ColumnElement[bool]:
    return sa.and_(_j.business_date >= day - dt.timedelta(days=1), _j.business_date <= day)


def journal_view(engine: Engine, bank_id: str, day: dt.date, posted_before: dt.datetime,
                 settled_before: dt.datetime) -> JournalView:
    """The journal's pays of settlement date `day` posted before `posted_before`, and the serials in doubt.
    Pays journaled the day before count too: one made after the utility's sign-off settles on `day`.

    A reversal counts once it is surely older than the cutoff at the utility too: a cancel journaled before
    `settled_before`, which is the cutoff less the skew allowance; a more recent one leaves its pay out on
    both sides, like an in-doubt one.

    Reads and parses every row of the two days: the reference `JournalViewCache` is held equal to."""
    with engine.connect() as conn:
        rows = conn.execute(_ROWS.where(_j.bank_id == bank_id, _days(day))).all()
    return _view_of((_fact(*r) for r in rows), day, posted_before, settled_before)


# Journal states a row can still leave (every other state is definite and final: its fact is kept).
OPEN_STATES = (jn.PENDING, jn.SUSPECT, jn.REVERSING, jn.RETRYABLE)
_a = jn.audit.c
_ROWS_BY_KEY = _ROWS.add_columns(_j.bank_id, _j.business_date)
_ONE_DAY = dt.timedelta(days=1)


class JournalViewCache:
    """`journal_view` at a cost per exchange that follows what changed, not the day's size.

    It keeps the fact of every journal row of the bank's two business days (bounded by those rows, the
    same rows `journal_view` reads at every exchange; the cache of the previous settlement date is dropped
    when the date changes). At each exchange, in one consistent snapshot of the journal:
    - the rows still open (PENDING/SUSPECT/REVERSING/RETRYABLE, the (business_date, state) index), and
      every row open at the previous exchange, are read again;
    - the rows named by audit lines (every state change writes one, in the same transaction) from
      `lookback_ids` below the last head seen (lines commit out of id order) whose state the cache does
      not hold yet are read: new rows that became definite between two exchanges;
    - the rows of the two days are counted: rows never leave the journal and a definite row never changes,
      so the cache holds every row of the snapshot exactly when the count equals its size. Otherwise (a line
      that committed later than the look-back window, or not in one snapshot on SQLite under writes) it
      rebuilds from a full read, as it also does every `rebuild_every` exchanges and when the date changes.
    The totals are then kept by `_Tally` as facts change (the cutoffs move with every exchange); nothing
    walks every pay of the day unless the cache rebuilds.
    Every read goes `page_rows` rows per fetch, so that the exchange's Python work comes in bounded slices
    between database round trips (it runs beside the pays, sharing their interpreter lock)."""

    def __init__(self, engine: Engine, bank_id: str, *, rebuild_every: int = 60, lookback_ids: int = 2_000,
                 page_rows: int = 500) -> None:
        if rebuild_every < 1 or lookback_ids < 0 or page_rows < 1:
            raise ValueError("rebuild_every and page_rows must be positive, lookback_ids not negative")
        self.engine = engine
        self.bank_id = bank_id
        self.rebuild_every = rebuild_every
        self.lookback_ids = lookback_ids
        self.page_rows = page_rows
        self._day: dt.date | None = None
        self._facts: dict[tuple[str, str], _Fact] = {}
        self._tally: _Tally | None = None  # None: to be counted from the facts at the next view
        self._open: set[tuple[str, str]] = set()
        self._head = 0
        self._since_rebuild = 0
        self.rebuilds = 0
        self.rows_read = 0  # journal rows read (and parsed where definite) by the last exchange

    def _connect(self) -> sa.Connection:
        conn = self.engine.connect()
        if self.engine.dialect.name == "sqlite":
            return conn.execution_options(read_only=True)  # a deferred BEGIN: one WAL snapshot
        return conn.execution_options(isolation_level="REPEATABLE READ")

    def view(self, day: dt.date, posted_before: dt.datetime, settled_before: dt.datetime) -> JournalView:
        with self._connect() as conn, conn.begin():
            if day != self._day or self._since_rebuild >= self.rebuild_every or not self._catch_up(conn, day):
                self._rebuild(conn, day)
        self._since_rebuild += 1
        return self._view_of_facts(day, posted_before, settled_before)

    def _view_of_facts(self, day: dt.date, posted_before: dt.datetime, settled_before: dt.datetime) -> JournalView:
        before_us, tally = _us(posted_before), self._tally
        if tally is None or tally.day != day.isoformat() or before_us < tally.before_us:
            tally = self._tally = _Tally(day.isoformat())
            for f in self._facts.values():
                tally.add(f)
        tally.advance(before_us, self._facts)
        totals, in_doubt = tally.totals(settled_before)
        facts = self._facts
        # Listed from the facts as they are when asked (the exchange asks before its next view).
        return JournalView(totals, in_doubt,
                           lambda: _entries_of(facts.values(), day, posted_before, settled_before)[0])

    def _pages(self, conn: sa.Connection, stmt: sa.Executable) -> Iterator[Sequence[Any]]:
        """The rows of `stmt`, page_rows at a time (a server-side cursor where the driver has one)."""
        result = conn.execution_options(yield_per=self.page_rows).execute(stmt)
        yield from result.partitions()

    def _keep(self, rows: Iterable[Any]) -> None:
        facts, tally = self._facts, self._tally
        for r in rows:
            f = _fact(*r)
            key = (f.kind, f.serial)
            old = facts.get(key)
            if old != f:
                facts[key] = f
                if tally is not None:
                    if old is not None:
                        tally.remove(old)
                    tally.add(f)
            if f.state in OPEN_STATES:
                self._open.add(key)
            else:
                self._open.discard(key)

    def _rebuild(self, conn: sa.Connection, day: dt.date) -> None:
        head = conn.execute(sa.select(sa.func.coalesce(sa.func.max(_a.audit_id), 0))).scalar_one()
        self._facts, self._open, self._tally = {}, set(), None
        read = 0
        for page in self._pages(conn, _ROWS.where(_j.bank_id == self.bank_id, _days(day))):
            self._keep(page)
            read += len(page)
        self._day, self._head, self._since_rebuild = day, int(head), 0
        self.rebuilds += 1
        self.rows_read = read

    @staticmethod
    def _among(conn: sa.Connection, serials: list[str]) -> sa.ColumnElement[bool]:
        if conn.dialect.name == "postgresql":  # one array parameter: no statement text rendered per serial
            return _j.serial == sa.any_(sa.bindparam("serials", serials, type_=ARRAY(sa.String(32))))
        return _j.serial.in_(serials)

    def _catch_up(self, conn: sa.Connection, day: dt.date) -> bool:
        """Brings the facts to the snapshot; False when a row was missed (the caller rebuilds)."""
        where = (_j.bank_id == self.bank_id, _days(day))
        still_open = conn.execute(_ROWS.where(*where, _j.state.in_(OPEN_STATES))).all()
        latest: dict[tuple[str, str], str] = {}
        for page in self._pages(conn, sa.select(_a.audit_id, _a.kind, _a.serial, _a.state).where(
                _a.audit_id > self._head - self.lookback_ids, _a.bank_id == self.bank_id).order_by(_a.audit_id)):
            for _, kind, serial, state in page:  # in id order: the last line wins
                latest[(kind, serial)] = state
            self._head = max(self._head, int(page[-1][0]))
        was_open = self._open
        self._open = set()
        self._keep(still_open)
        stale = {k for k in was_open if k not in self._open}
        for key, state in latest.items():
            known = self._facts.get(key)
            if known is None or known.state != state:
                stale.add(key)
        stale.difference_update(r[:2] for r in still_open)
        read = len(still_open)
        for kind in (jn.PAY, jn.CANCEL):
            serials = sorted(s for k, s in stale if k == kind)
            for i in range(0, len(serials), self.page_rows):
                # by primary key alone (a plan that cannot turn into a scan), the day and bank checked here
                got = conn.execute(_ROWS_BY_KEY.where(
                    _j.kind == kind, self._among(conn, serials[i:i + self.page_rows]))).all()
                rows = [r[:-2] for r in got if r[-2] == self.bank_id and day - _ONE_DAY <= r[-1] <= day]
                self._keep(rows)
                read += len(rows)
        self.rows_read = read
        count = conn.execute(sa.select(sa.func.count()).select_from(jn.requests).where(*where)).scalar_one()
        return int(count) == len(self._facts)


@dataclass(frozen=True)
class ExchangeLimits:
    interval_s: float = 10.0
    window_s: float = 30.0
    settle_s: float = 5.0
    call_timeout_s: float = 5.0
    in_doubt_max: int = 1_000
    list_page_max: int = 1_000
    list_pages_max: int = 200
    serials_logged: int = 10
    page_rows: int = 500  # journal rows per fetch (JournalViewCache)
    rebuild_every: int = 60  # exchanges between two full reads of the journal's two days


@dataclass
class ControlTotalsExchanger:
    """The background exchange of one bank's control totals (see the module docstring)."""
    engine: Engine
    upstream: Upstream
    clock: Clock
    bank_id: str
    limits: ExchangeLimits
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _to_report: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tracker = DivergenceTracker(self.limits.window_s)
        self.journal = JournalViewCache(self.engine, self.bank_id, rebuild_every=self.limits.rebuild_every,
                                        page_rows=self.limits.page_rows)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="control-totals", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.limits.interval_s):
            try:
                self.exchange_once()
            except sa.exc.SQLAlchemyError:  # the journal's database is unreachable: try at the next interval
                log.warning("event=control_totals_journal_unreadable bank=%s", self.bank_id, exc_info=True)
                business_metrics.record_control_exchange(self.bank_id, "FAILED")

    def exchange_once(self) -> str:
        """One exchange; returns its result (AGREE, WATCHING, FLAGGED, RECONCILED, SKIPPED or FAILED)."""
        now = utc_now(self.clock)
        day = business_date(self.clock)
        cutoff = now - dt.timedelta(seconds=self.limits.settle_s)
        settled_before = cutoff - dt.timedelta(seconds=self.limits.settle_s)
        view = self.journal.view(day, cutoff, settled_before)
        if len(view.in_doubt) > self.limits.in_doubt_max:
            log.info("event=control_totals_skipped bank=%s in_doubt=%d", self.bank_id, len(view.in_doubt))
            business_metrics.record_control_exchange(self.bank_id, "SKIPPED")
            return "SKIPPED"
        req = self._request(day, cutoff, view)
        req.differing_serials.extend(self._to_report)
        answer = self.upstream.call("ExchangeControlTotals", req, self.limits.call_timeout_s)
        if answer.response is None:
            log.info("event=control_totals_exchange_failed bank=%s code=%s", self.bank_id, answer.code.name)
            business_metrics.record_control_exchange(self.bank_id, "FAILED")
            return "FAILED"
        self._to_report = []
        resp: pb.ExchangeControlTotalsResponse = answer.response
        if resp.reconciled:
            verdict = self.tracker.settle(self.bank_id, day, now)
            result = "RECONCILED"
        else:
            t = resp.totals
            theirs = ControlTotals(t.posted_count, t.posted_fen, t.reversed_count, t.reversed_fen)
            verdict = self.tracker.observe(self.bank_id, day, divergence(view.totals, theirs), now)
            result = verdict.state
        business_metrics.record_control_exchange(self.bank_id, result)
        business_metrics.set_control_divergence(self.bank_id, verdict.gauge_fen, verdict.gauge_count)
        self._log(day, verdict, view, resp)
        if verdict.newly_flagged:
            serials = self._differing(day, cutoff, view)
            log.error("event=control_totals_differing_serials bank=%s settlement_date=%s serials=%s",
                      self.bank_id, day, ",".join(serials) or "-")
            self._to_report = serials
        return result

    def _request(self, day: dt.date, cutoff: dt.datetime, view: JournalView, *, list_max: int = 0,
                 after: str = "") -> pb.ExchangeControlTotalsRequest:
        t = view.totals
        req = pb.ExchangeControlTotalsRequest(
            settlement_date=day.isoformat(), in_doubt_serials=view.in_doubt, list_max=list_max,
            list_after_serial=after,
            totals=pb.ControlTotals(posted_count=t.posted_count, posted_fen=t.posted_fen,
                                    reversed_count=t.reversed_count, reversed_fen=t.reversed_fen))
        req.posted_before.FromDatetime(cutoff)
        return req

    def _differing(self, day: dt.date, cutoff: dt.datetime, view: JournalView) -> list[str]:
        """The first differing serials, paging through the utility's entries (bounded by list_pages_max)."""
        found: list[str] = []
        after = ""
        for _page in range(self.limits.list_pages_max):
            req = self._request(day, cutoff, view, list_max=self.limits.list_page_max, after=after)
            answer = self.upstream.call("ExchangeControlTotals", req, self.limits.call_timeout_s)
            if answer.response is None:
                break
            resp: pb.ExchangeControlTotalsResponse = answer.response
            theirs = [(e.bank_serial, Entry(e.amount_fen, e.reversed)) for e in resp.entries]
            through = resp.next_after_serial or None
            found += differing_serials(view.entries, theirs, after=after, through=through,
                                       limit=self.limits.serials_logged - len(found))
            if through is None or len(found) >= self.limits.serials_logged:
                break
            after = through
        return found

    def _log(self, day: dt.date, verdict: Verdict, view: JournalView, resp: pb.ExchangeControlTotalsResponse
             ) -> None:
        if verdict.newly_flagged:
            t, m = view.totals, resp.totals
            log.error("event=control_totals_diverged bank=%s settlement_date=%s divergence_fen=%d "
                      "divergence_count=%d persisted_s=%.1f bridge=%d/%dfen+%d/%dfen_reversed "
                      "mis=%d/%dfen+%d/%dfen_reversed", self.bank_id, day, verdict.divergence.fen,
                      verdict.divergence.count, verdict.persisted_s, t.posted_count, t.posted_fen,
                      t.reversed_count, t.reversed_fen, m.posted_count, m.posted_fen, m.reversed_count,
                      m.reversed_fen)
        elif verdict.cleared:
            log.warning("event=control_totals_agree_again bank=%s settlement_date=%s", self.bank_id, day)
        elif verdict.state != AGREE:
            log.debug("event=control_totals_watching bank=%s divergence_fen=%d persisted_s=%.1f", self.bank_id,
                      verdict.divergence.fen, verdict.persisted_s)
