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
import logging
import sys
import threading
from collections.abc import Iterable
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
    entries: dict[str, Entry]
    in_doubt: list[str]

    @property
    def totals(self) -> ControlTotals:
        return totals_of(self.entries.values())


def _reversed_by_utility(message: str) -> bool:
    """A NOT_APPLIED pay's resolution says the utility had posted, then reversed it."""
    return "reversed" in message.lower()


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite and MariaDB hand back naive datetimes; the journal stores UTC instants.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class _Fact(NamedTuple):
    """What one journal row contributes, parsed once (a definite row's never changes); whether it counts
    as of a cutoff is decided in `_view_of`, so the same fact serves every exchange."""
    kind: str
    serial: str
    state: str
    doubt: bool  # a pay in doubt whatever the cutoff; a cancel whose original is
    entry: Entry | None  # a POSTED pay's, built once
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
            return _Fact(kind, serial, state, True, None, "", 0, original, None, False)
        if state == jn.POSTED:
            resp = pb.PayResponse.FromString(body or b"")
            at = resp.posted_at  # compared in whole microseconds, as Timestamp.ToDatetime truncates (3 us a row)
            return _Fact(kind, serial, state, False, Entry(int(amount_fen), False), sys.intern(resp.settlement_date),
                         at.seconds * 1_000_000 + at.nanos // 1_000, original, None, False)
        return _Fact(kind, serial, state, False, None, "", 0, original, None, False)
    created = _utc(created_at)
    if state in CANCEL_IN_DOUBT:
        return _Fact(kind, serial, state, True, None, "", 0, original, created, False)
    reverses = state == jn.CANCELLED and \
        pb.CancelResponse.FromString(body or b"").outcome == pb.CANCEL_OUTCOME_REVERSED
    return _Fact(kind, serial, state, False, None, "", 0, original, created, reverses)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US = dt.timedelta(microseconds=1)


def _view_of(facts: Iterable[_Fact], day: dt.date, posted_before: dt.datetime,
             settled_before: dt.datetime) -> JournalView:
    entries: dict[str, Entry] = {}
    in_doubt: set[str] = set()
    reversed_serials: set[str] = set()
    iso_day = day.isoformat()
    pay = jn.PAY
    before_us = (_utc(posted_before) - _EPOCH) // _US
    for f in facts:
        if f.kind == pay:
            if f.doubt:
                in_doubt.add(f.serial)
            elif f.settlement_date == iso_day and f.posted_at_us < before_us:
                entries[f.serial] = f.entry  # type: ignore[assignment]
        elif f.doubt or f.created_at >= settled_before:  # type: ignore[operator]
            in_doubt.add(f.original)
        elif f.reverses:
            reversed_serials.add(f.original)
    for serial in reversed_serials & entries.keys():
        entries[serial] = Entry(entries[serial].amount_fen, True)
    for serial in in_doubt:
        entries.pop(serial, None)
    return JournalView(entries, sorted(in_doubt))


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
    The view is then computed from the facts without parsing (the cutoffs move with every exchange)."""

    def __init__(self, engine: Engine, bank_id: str, *, rebuild_every: int = 60, lookback_ids: int = 2_000) -> None:
        self.engine = engine
        self.bank_id = bank_id
        self.rebuild_every = rebuild_every
        self.lookback_ids = lookback_ids
        self._day: dt.date | None = None
        self._facts: dict[tuple[str, str], _Fact] = {}
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
        return _view_of(self._facts.values(), day, posted_before, settled_before)

    def _keep(self, rows: Iterable[Any]) -> None:
        for r in rows:
            f = _fact(*r)
            key = (f.kind, f.serial)
            self._facts[key] = f
            if f.state in OPEN_STATES:
                self._open.add(key)
            else:
                self._open.discard(key)

    def _rebuild(self, conn: sa.Connection, day: dt.date) -> None:
        head = conn.execute(sa.select(sa.func.coalesce(sa.func.max(_a.audit_id), 0))).scalar_one()
        rows = conn.execute(_ROWS.where(_j.bank_id == self.bank_id, _days(day))).all()
        self._facts, self._open = {}, set()
        self._keep(rows)
        self._day, self._head, self._since_rebuild = day, int(head), 0
        self.rebuilds += 1
        self.rows_read = len(rows)

    @staticmethod
    def _among(conn: sa.Connection, serials: list[str]) -> sa.ColumnElement[bool]:
        if conn.dialect.name == "postgresql":  # one array parameter: no statement text rendered per serial
            return _j.serial == sa.any_(sa.bindparam("serials", serials, type_=ARRAY(sa.String(32))))
        return _j.serial.in_(serials)

    def _catch_up(self, conn: sa.Connection, day: dt.date) -> bool:
        """Brings the facts to the snapshot; False when a row was missed (the caller rebuilds)."""
        where = (_j.bank_id == self.bank_id, _days(day))
        still_open = conn.execute(_ROWS.where(*where, _j.state.in_(OPEN_STATES))).all()
        lines = conn.execute(sa.select(_a.audit_id, _a.kind, _a.serial, _a.state).where(
            _a.audit_id > self._head - self.lookback_ids, _a.bank_id == self.bank_id).order_by(_a.audit_id)).all()
        was_open = self._open
        self._open = set()
        self._keep(still_open)
        stale = {k for k in was_open if k not in self._open}
        latest = {(kind, serial): state for _, kind, serial, state in lines}  # in id order: the last line wins
        if lines:
            self._head = max(self._head, int(lines[-1][0]))
        for key, state in latest.items():
            known = self._facts.get(key)
            if known is None or known.state != state:
                stale.add(key)
        stale.difference_update(r[:2] for r in still_open)
        read = len(still_open)
        for kind in (jn.PAY, jn.CANCEL):
            serials = sorted(s for k, s in stale if k == kind)
            for i in range(0, len(serials), 500):
                # by primary key alone (a plan that cannot turn into a scan), the day and bank checked here
                got = conn.execute(_ROWS_BY_KEY.where(_j.kind == kind, self._among(conn, serials[i:i + 500]))).all()
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
        self.journal = JournalViewCache(self.engine, self.bank_id)

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
