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
import threading
from dataclasses import dataclass, field

import sqlalchemy as sa
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

__all__ = ["ControlTotalsExchanger", "ExchangeLimits", "JournalView", "journal_view"]

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


def journal_view(engine: Engine, bank_id: str, day: dt.date, posted_before: dt.datetime,
                 settled_before: dt.datetime) -> JournalView:
    """The journal's pays of settlement date `day` posted before `posted_before`, and the serials in doubt.
    Pays journaled the day before count too: one made after the utility's sign-off settles on `day`.

    A reversal counts once it is surely older than the cutoff at the utility too: a cancel journaled before
    `settled_before`, which is the cutoff less the skew allowance; a more recent one leaves its pay out on
    both sides, like an in-doubt one."""
    entries: dict[str, Entry] = {}
    in_doubt: set[str] = set()
    reversed_serials: set[str] = set()
    iso_day = day.isoformat()
    with engine.connect() as conn:
        rows = conn.execute(_ROWS.where(_j.bank_id == bank_id, _j.business_date >= day - dt.timedelta(days=1),
                                        _j.business_date <= day)).all()
    for kind, serial, state, amount_fen, body, original, message, created_at in rows:
        if kind == jn.PAY:
            if state in PAY_IN_DOUBT:
                in_doubt.add(serial)
            elif state == jn.POSTED:
                resp = pb.PayResponse.FromString(body or b"")
                if resp.settlement_date == iso_day and \
                        resp.posted_at.ToDatetime(tzinfo=dt.UTC) < posted_before:
                    entries[serial] = Entry(int(amount_fen), False)
            elif state == jn.NOT_APPLIED and _reversed_by_utility(message or ""):
                in_doubt.add(serial)
        elif state in CANCEL_IN_DOUBT or _utc(created_at) >= settled_before:
            in_doubt.add(original)
        elif state == jn.CANCELLED and pb.CancelResponse.FromString(body or b"").outcome == \
                pb.CANCEL_OUTCOME_REVERSED:
            reversed_serials.add(original)
    for serial in reversed_serials & entries.keys():
        entries[serial] = Entry(entries[serial].amount_fen, True)
    for serial in in_doubt:
        entries.pop(serial, None)
    return JournalView(entries, sorted(in_doubt))


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
        view = journal_view(self.engine, self.bank_id, day, cutoff, settled_before)
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
