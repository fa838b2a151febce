"""The utility front end's scrape-time gauges, read from the branch databases:
arrears households and fen by branch (one aggregate over unpaid bills), and
the bill feed's backlog and lag per bank (outbox rows above the cursor), and
each bank's link state (签到/签退, the operator's suspension overriding it).
Connection-pool use of the serving engines comes with them.

Reads are cached for `CollectorLimits.refresh_s` and bounded by a statement
timeout on a dedicated connection (see yindian_common.business_metrics), so
scrapes never load the databases nor wait on the serving pool. Nothing here
writes, and no label carries an account number."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.engine import Engine

from mis_adapter.db.core import Bank, BillRow, Branch, Customer
from mis_adapter.db.feed import FeedCursor, OutboxRow
from mis_adapter.db.link import BankLink
from yindian_common import business_metrics as bm
from yindian_common.clock import Clock

__all__ = ["MisCollector", "register"]

UNPAID = ("UNPAID", "PARTIAL")

_bills = BillRow.__table__
_customers = Customer.__table__
_branches = Branch.__table__

# Unpaid bills in one scan of the bills (status is not indexed: a payment changes it on every bill it
# settles, and unindexed it lets PostgreSQL update the bill HOT, see migration 0004_bills_hot), then every
# branch, with zeros where nothing is owed. Unpaid principal = amount - prepaid applied - principal paid.
# The read runs once per CollectorLimits.refresh_s under its statement timeout.
_owed = (
    sa.select(_customers.c.branch_code.label("branch_code"),
              sa.func.count(sa.distinct(_bills.c.account_no)).label("households"),
              sa.func.sum(_bills.c.amount_fen - _bills.c.prepaid_applied_fen
                          - _bills.c.principal_paid_fen).label("owed_fen"))
    .select_from(_bills.join(_customers, _customers.c.account_no == _bills.c.account_no))
    .where(_bills.c.status.in_(UNPAID))
    .group_by(_customers.c.branch_code)
    .subquery("owed")
)
ARREARS_BY_BRANCH = (
    sa.select(_branches.c.code, sa.func.coalesce(_owed.c.households, 0), sa.func.coalesce(_owed.c.owed_fen, 0))
    .select_from(_branches.outerjoin(_owed, _owed.c.branch_code == _branches.c.code))
)

_banks = Bank.__table__
_outbox = OutboxRow.__table__
_cursors = FeedCursor.__table__

# Every bank appears; the backlog is its notices above the cursor (a range of the outbox's primary key).
FEED_BACKLOG_BY_BANK = (
    sa.select(_banks.c.bank_id, sa.func.count(_outbox.c.seq), sa.func.min(_outbox.c.issued_at))
    .select_from(_banks
                 .outerjoin(_cursors, _cursors.c.bank_id == _banks.c.bank_id)
                 .outerjoin(_outbox, sa.and_(_outbox.c.bank_id == _banks.c.bank_id,
                                             _outbox.c.seq > sa.func.coalesce(_cursors.c.acked_through_seq, 0))))
    .group_by(_banks.c.bank_id)
)

_links = BankLink.__table__
# Every bank with its link state; no row: never signed on or off (served as open).
LINK_STATE_BY_BANK = (
    sa.select(_banks.c.bank_id, _banks.c.suspended, _links.c.state)
    .select_from(_banks.outerjoin(_links, _links.c.bank_id == _banks.c.bank_id))
)
# The gauge's state label takes exactly these values (one of them is 1 per bank).
LINK_STATES = ("open", "signed_on", "signed_off", "suspended")

ARREARS_HOUSEHOLDS = "yindian_arrears_households"
ARREARS_FEN = "yindian_arrears_fen"
FEED_BACKLOG = "yindian_feed_backlog_notices"
FEED_LAG = "yindian_feed_lag_seconds"
LINK_STATE = "yindian_bank_link_state"


def link_state_label(suspended: bool, state: str | None) -> str:
    """The one state a bank is shown in: suspension (停工) overrides sign-on."""
    if suspended:
        return "suspended"
    return {"SIGNED_ON": "signed_on", "SIGNED_OFF": "signed_off"}.get(state or "", "open")


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; the processes store UTC instants.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class MisCollector(bm.DbGaugeCollector):
    name = "mis_adapter"
    specs = (
        bm.GaugeSpec(ARREARS_HOUSEHOLDS, "Accounts with unpaid bills, by branch.", ("branch",)),
        bm.GaugeSpec(ARREARS_FEN, "Unpaid principal of all bills, in fen, by branch.", ("branch",)),
        bm.GaugeSpec(FEED_BACKLOG, "Bill notices not yet acknowledged by the bank (outbox backlog).", ("bank",)),
        bm.GaugeSpec(FEED_LAG, "Age of the oldest unacknowledged bill notice, in seconds.", ("bank",), merge="max"),
        bm.GaugeSpec(LINK_STATE, "1 for the bank's link state (open, signed_on, signed_off, suspended), else 0.",
                     ("bank", "state"), merge="max"),
    )

    def __init__(self, engines: Iterable[Engine], clock: Clock,
                 limits: bm.CollectorLimits = bm.DEFAULT_COLLECTOR_LIMITS) -> None:
        super().__init__(engines, limits)
        self._clock = clock

    def read(self, conn: sa.Connection) -> bm.Readings:
        households: dict[tuple[str, ...], float] = {}
        fen: dict[tuple[str, ...], float] = {}
        for code, n, owed_fen in conn.execute(ARREARS_BY_BRANCH):
            households[(code,)] = float(n)
            fen[(code,)] = float(owed_fen)
        return {ARREARS_HOUSEHOLDS: households, ARREARS_FEN: fen, **self._read_feed(conn),
                LINK_STATE: self._read_links(conn)}

    def _read_links(self, conn: sa.Connection) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for bank, suspended, state in conn.execute(LINK_STATE_BY_BANK):
            shown = link_state_label(bool(suspended), state)
            for label in LINK_STATES:
                out[(bank, label)] = 1.0 if label == shown else 0.0
        return out

    def _read_feed(self, conn: sa.Connection) -> bm.Readings:
        backlog: dict[tuple[str, ...], float] = {}
        lag: dict[tuple[str, ...], float] = {}
        now = self._clock.now()
        for bank, n, oldest in conn.execute(FEED_BACKLOG_BY_BANK):
            bm.initialize_utility_bank(bank)
            backlog[(bank,)] = float(n)
            lag[(bank,)] = max(0.0, (now - _utc(oldest)).total_seconds()) if oldest is not None else 0.0
        return {FEED_BACKLOG: backlog, FEED_LAG: lag}


def register(engines: Sequence[Engine], clock: Clock, limits: bm.CollectorLimits = bm.DEFAULT_COLLECTOR_LIMITS,
             registry: CollectorRegistry = REGISTRY) -> MisCollector:
    """Registers the arrears/feed collector and the pool collector for these engines; counts their errors.
    serve.py: `metrics_collector.register(ctx.router.engines(), ctx.clock)`."""
    for engine in engines:
        bm.instrument_engine(engine)
    collector = MisCollector(engines, clock, limits)
    bm.register_collectors(registry, "mis_adapter", [collector, bm.PoolCollector(engines)])
    return collector
