"""Issuing bills: tariff, prepaid credit first, the outbox written with the
bill and a gapless per-bank seq, and the gapless-sequence trap (issuers
committing out of order)."""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence

import pytest
import sqlalchemy as sa

from mis_adapter.bench_data import populate_period
from mis_adapter.db.core import BillRow, Customer, PrepaidEntry, Reading
from mis_adapter.db.feed import OutboxRow
from mis_adapter.issue_bills import issue_bills
from mis_adapter.tariff import price_fen
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
NOON = dt.datetime(2026, 11, 28, 12, 0, tzinfo=SHANGHAI)
PERIOD = "202611"
T_OUT = OutboxRow.__table__
T_BILLS = BillRow.__table__


def _outbox(engine: sa.Engine, bank: str) -> list[sa.Row]:  # type: ignore[type-arg]
    with engine.connect().execution_options(read_only=True) as conn:
        return list(conn.execute(sa.select(T_OUT).where(T_OUT.c.bank_id == bank).order_by(T_OUT.c.seq)))


@pytest.mark.timeout(120)
def test_issue_prices_applies_prepaid_and_feeds_agreements(db_url_sqlite_pg: str) -> None:
    engine = make_engine(db_url_sqlite_pg)
    clock = ManualClock(NOON)
    people = populate_period(engine, 300, PERIOD, banks=("ICBC", "ABC"), now=NOON, prepaid_share=0.3,
                             agreement_share=0.8)
    summary = issue_bills(engine, clock, PERIOD, batch_accounts=70)
    assert summary.bills == 300
    with engine.connect() as conn:
        bills = {r.account_no: r for r in conn.execute(sa.select(T_BILLS))}
        kwh = dict(conn.execute(sa.select(Reading.__table__.c.account_no, Reading.__table__.c.kwh)).all())
        unbilled = conn.execute(sa.select(sa.func.count()).select_from(Reading.__table__)
                                .where(Reading.__table__.c.billed == sa.false())).scalar_one()
        prepaid_left = dict(conn.execute(sa.select(Customer.__table__.c.account_no,
                                                   Customer.__table__.c.prepaid_fen)).all())
        applied_entries = conn.execute(sa.select(sa.func.count(), sa.func.sum(PrepaidEntry.__table__.c.delta_fen))
                                       .where(PrepaidEntry.__table__.c.reason == "BILL_APPLIED")).one()
    assert unbilled == 0
    with_credit = [b for b in bills.values() if b.prepaid_applied_fen > 0]
    assert with_credit, "some households had prepaid credit"
    assert applied_entries[0] == len(with_credit)
    assert -applied_entries[1] == sum(b.prepaid_applied_fen for b in with_credit) == summary.prepaid_applied_fen
    for acct, b in bills.items():
        assert b.amount_fen == price_fen(kwh[acct], "RESIDENTIAL")
        assert b.due_date == dt.date(2026, 12, 18)
        assert b.status == ("PAID" if b.prepaid_applied_fen == b.amount_fen else "UNPAID")
    assert all(prepaid_left[b.account_no] >= 0 for b in with_credit)

    for bank in ("ICBC", "ABC"):
        rows = _outbox(engine, bank)
        assert [r.seq for r in rows] == list(range(1, len(rows) + 1)), "gapless, from 1"
        expected = {a for a, bk in people if bk == bank and bills[a].status != "PAID"}
        assert {r.account_no for r in rows} == expected
        for r in rows:
            b = bills[r.account_no]
            assert (r.bill_id, r.amount_fen, r.period) == (b.bill_id, b.amount_fen - b.prepaid_applied_fen, PERIOD)
        assert summary.fed[bank] == len(rows)

    again = issue_bills(engine, clock, PERIOD)
    assert again.bills == 0 and not again.fed, "issuing again issues nothing"
    engine.dispose()


@pytest.mark.timeout(120)
def test_issuers_committing_out_of_order_lose_no_seq(db_url_sqlite_pg: str) -> None:
    """The gapless-sequence trap: transaction A takes its seqs and holds them
    uncommitted while B issues for the same bank; whatever the commit order,
    seqs end up gapless and in commit order, so a cursor never passes a
    notice that was still uncommitted."""
    engine = make_engine(db_url_sqlite_pg)
    clock = ManualClock(NOON)
    people = populate_period(engine, 40, PERIOD, now=NOON)
    accts = [a for a, _ in people]
    a_inside = threading.Event()
    release_a = threading.Event()
    seen_while_a_open: list[int] = []

    def hold(_batch: Sequence[str]) -> None:
        a_inside.set()
        assert release_a.wait(60)

    ta = threading.Thread(target=lambda: issue_bills(engine, clock, PERIOD, accounts=accts[:20], before_commit=hold))
    ta.start()
    assert a_inside.wait(60)
    tb = threading.Thread(target=lambda: issue_bills(engine, clock, PERIOD, accounts=accts[20:]))
    tb.start()
    # While A is open nothing of A or B is visible to a reader of the outbox.
    seen_while_a_open.extend(r.seq for r in _outbox(engine, "ICBC"))
    if engine.dialect.name == "postgresql":
        _wait_for_lock_waiter(engine)
    release_a.set()
    ta.join(60)
    tb.join(60)
    rows = _outbox(engine, "ICBC")
    assert seen_while_a_open == []
    assert [r.seq for r in rows] == list(range(1, 41))
    # A committed first, so A's bills hold the first seqs.
    assert {r.account_no for r in rows[:20]} == set(accts[:20])
    engine.dispose()


def _wait_for_lock_waiter(engine: sa.Engine) -> None:
    """B must really be blocked behind A's counter-row lock before A commits."""
    q = sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
    for _ in range(600):
        with engine.connect() as conn:
            if conn.execute(q).scalar_one() > 0:
                return
        threading.Event().wait(0.05)
    raise AssertionError("issuer B never waited for A's lock")


@pytest.mark.timeout(180)
def test_concurrent_batches_issue_what_one_issuer_does(db_url: str) -> None:
    """Several batches issued at once (workers) give the same bills and notices
    as one issuer: every account billed once at tariff, each notice the bill's
    due amount, seqs gapless from 1 and each bank's notices in commit order of
    their batches (each batch's accounts hold consecutive seqs)."""
    engine = make_engine(db_url)
    people = populate_period(engine, 260, PERIOD, banks=("ICBC", "ABC"), now=NOON, prepaid_share=0.3,
                             agreement_share=0.8)
    summary = issue_bills(engine, ManualClock(NOON), PERIOD, batch_accounts=25, workers=4)
    assert summary.bills == 260
    with engine.connect() as conn:
        bills = {r.account_no: r for r in conn.execute(sa.select(T_BILLS))}
    assert set(bills) == {a for a, _ in people}
    for bank in ("ICBC", "ABC"):
        rows = _outbox(engine, bank)
        assert [r.seq for r in rows] == list(range(1, len(rows) + 1)), "gapless, from 1"
        assert {r.account_no for r in rows} == {a for a, bk in people if bk == bank and bills[a].status != "PAID"}
        for r in rows:
            b = bills[r.account_no]
            assert (r.bill_id, r.amount_fen) == (b.bill_id, b.amount_fen - b.prepaid_applied_fen)
        assert summary.fed[bank] == len(rows) and summary.fed_fen[bank] == sum(r.amount_fen for r in rows)
        # a batch (25 consecutive accounts) takes its seqs in one step: its notices are consecutive
        batch_of = {a: i // 25 for i, (a, _) in enumerate(people)}
        runs = [batch_of[r.account_no] for r in rows]
        for b in set(runs):
            at = [i for i, x in enumerate(runs) if x == b]
            assert at == list(range(at[0], at[-1] + 1)), f"batch {b}'s notices are consecutive"
    engine.dispose()
