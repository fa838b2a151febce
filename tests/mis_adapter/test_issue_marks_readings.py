"""Issuing marks the readings it prices, and only those (issue_bills).

On PostgreSQL and SQLite one `UPDATE readings ... RETURNING` marks a batch's
readings billed and answers their kWh; MariaDB (no UPDATE ... RETURNING) reads
the readings and then marks the same readings by id. The property test holds the one
statement equal to the read-then-mark rule on random households: several
meters, readings already billed, a bill of the period already issued, a reading
of another period, no agreement, prepaid credit. And on PostgreSQL the marking
is a HOT update (0004_readings_hot: room on each readings page)."""
from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import issue_bills as issue_mod
from mis_adapter.bench_data import populate_period
from mis_adapter.db.core import BillRow, Meter, Reading
from mis_adapter.db.feed import OutboxRow
from mis_adapter.issue_bills import issue_bills
from mis_adapter.migrate import downgrade, upgrade
from mis_adapter.tariff import Tariff
from tests.support.databases import fresh_database
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
NOON = dt.datetime(2026, 11, 28, 12, 0, tzinfo=SHANGHAI)
PERIOD, OTHER_PERIOD = "202611", "202610"
T_READ, T_METER, T_BILLS, T_OUT = (Reading.__table__, Meter.__table__, BillRow.__table__,
                                   OutboxRow.__table__)
HOUSEHOLDS_MAX = 8
COPY_OFFSET = 100   # the second copy's first account serial, after the first copy's
_serials = itertools.count(1, 2 * COPY_OFFSET)

# per household: extra meters' readings as (kwh, already billed); whether a bill of the period exists;
# whether a reading of another period is there
_household = st.tuples(st.lists(st.tuples(st.integers(0, 500), st.booleans()), max_size=2),
                       st.booleans(), st.booleans(), st.booleans())


def _shape(engine: sa.Engine, first: int, households: list[Any], prepaid: float, agreed: float) -> list[str]:
    people = populate_period(engine, len(households), PERIOD, banks=("ICBC", "ABC"), now=NOON,
                             first_serial=first, prepaid_share=prepaid, agreement_share=agreed)
    accts = [a for a, _ in people]
    with engine.begin() as conn:
        for acct, (extra, first_billed, billed_before, other_period) in zip(accts, households, strict=True):
            if first_billed:
                conn.execute(T_READ.update().where(T_READ.c.account_no == acct).values(billed=True))
            for i, (kwh, billed) in enumerate(extra):
                meter = f"X{i}{acct}"
                conn.execute(T_METER.insert().values(meter_no=meter, account_no=acct,
                                                     installed_on=dt.date(2020, 1, 1)))
                conn.execute(T_READ.insert().values(meter_no=meter, account_no=acct, period=PERIOD, kwh=kwh,
                                                    register_kwh=kwh, read_on=NOON.date(), billed=billed))
            if other_period:
                conn.execute(T_READ.insert().values(meter_no=f"M{acct}", account_no=acct, period=OTHER_PERIOD,
                                                    kwh=77, register_kwh=77, read_on=NOON.date(), billed=False))
            if billed_before:
                conn.execute(T_BILLS.insert().values(
                    account_no=acct, period=PERIOD, kwh=1, amount_fen=100, prepaid_applied_fen=0,
                    principal_paid_fen=0, late_fee_paid_fen=0, accrual_micro=0, accrual_date=NOON.date(),
                    due_date=NOON.date(), issued_at=NOON, status="UNPAID", paid_on=None, dunning=False))
    return accts


def _outcome(engine: sa.Engine, accts: list[str]) -> tuple[Any, ...]:
    """What issuing left, per household by its place in the list (the two copies' accounts differ)."""
    at = {a: i for i, a in enumerate(accts)}
    with engine.connect() as conn:
        bills = sorted((at[r.account_no], r.kwh, r.amount_fen, r.prepaid_applied_fen, r.status)
                       for r in conn.execute(sa.select(T_BILLS).where(T_BILLS.c.account_no.in_(accts))))
        readings = sorted((at[r.account_no], r.meter_no.replace(r.account_no, ""), r.period, r.kwh, r.billed)
                          for r in conn.execute(sa.select(T_READ).where(T_READ.c.account_no.in_(accts))))
        notices = sorted((r.bank_id, at[r.account_no], r.kwh, r.amount_fen)
                         for r in conn.execute(sa.select(T_OUT).where(T_OUT.c.account_no.in_(accts))))
    return bills, readings, notices


@pytest.mark.timeout(600)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(households=st.lists(_household, min_size=1, max_size=HOUSEHOLDS_MAX),
       prepaid=st.sampled_from([0.0, 0.5, 1.0]), agreed=st.sampled_from([0.0, 0.7, 1.0]),
       batch=st.integers(1, 4))
def test_marking_with_returning_equals_reading_then_marking(db_url: str, households: list[Any], prepaid: float,
                                                             agreed: float, batch: int) -> None:
    engine = make_engine(db_url)
    clock = ManualClock(NOON)
    first = next(_serials)
    one = _shape(engine, first, households, prepaid, agreed)
    two = _shape(engine, first + COPY_OFFSET, households, prepaid, agreed)
    fast = issue_bills(engine, clock, PERIOD, accounts=one, batch_accounts=batch)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(issue_mod, "_marks_returning", lambda conn: False)
        rule = issue_bills(engine, clock, PERIOD, accounts=two, batch_accounts=batch)
    assert (fast.bills, fast.amount_fen, fast.prepaid_applied_fen, fast.fed, fast.fed_fen, fast.skipped_existing) \
        == (rule.bills, rule.amount_fen, rule.prepaid_applied_fen, rule.fed, rule.fed_fen, rule.skipped_existing)
    assert _outcome(engine, one) == _outcome(engine, two)
    engine.dispose()


@pytest.mark.timeout(120)
def test_marking_readings_billed_is_a_hot_update_on_postgresql(pg_url: str) -> None:
    engine = make_engine(pg_url)
    people = populate_period(engine, 600, PERIOD, now=NOON)   # several pages of readings
    summary = issue_mod.IssueSummary(PERIOD)
    with engine.begin() as conn:   # one batch, so that this transaction's own counters show every update
        issue_mod._issue_batch(conn, [a for a, _ in people], PERIOD, Tariff(), NOON, NOON.date(),
                               NOON.date() + dt.timedelta(days=20), summary)
        updated, hot = conn.execute(sa.text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                                            "WHERE relname = 'readings'")).one()
        unbilled = conn.execute(sa.select(sa.func.count()).select_from(T_READ)
                                .where(T_READ.c.billed == sa.false())).scalar_one()
        options = conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'readings'")).scalar_one()
    assert summary.bills == 600 and unbilled == 0
    assert (updated, hot) == (600, 600)
    assert "fillfactor=50" in (options or [])
    downgrade(engine, "0004_readings_hot@-1")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'readings'")).scalar_one() \
            is None
    upgrade(engine)
    engine.dispose()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_reading_committed_while_a_batch_is_priced_is_left_unbilled_not_marked(backend: str,
                                                                                   tmp_path: Path) -> None:
    """A meter reading that lands while issuing prices its batch (another writer, committed between the
    read and the mark) is not in the bill, so it must not be marked billed: it stays unbilled, visible to
    the next run. (SQLite is left out: its one writer at a time cannot commit between the two.) On MariaDB,
    marking by account instead of by the readings priced marked it billed."""
    with fresh_database(backend, tmp_path) as url:
        engine = make_engine(url)
        (acct, _), = populate_period(engine, 1, PERIOD, now=NOON)
        with engine.begin() as conn:   # a second meter, installed before (its row is not what issuing locks)
            conn.execute(T_METER.insert().values(meter_no=f"L{acct}", account_no=acct,
                                                 installed_on=dt.date(2020, 1, 1)))
            kwh_before = conn.execute(sa.select(sa.func.sum(T_READ.c.kwh)).where(T_READ.c.account_no == acct)
                                      ).scalar_one()
        other = make_engine(url)
        price = issue_mod.price_fen

        def price_while_a_reading_lands(kwh: int, *args: Any) -> int:
            with other.begin() as conn:
                conn.execute(T_READ.insert().values(meter_no=f"L{acct}", account_no=acct, period=PERIOD, kwh=55,
                                                    register_kwh=55, read_on=NOON.date(), billed=False))
            return price(kwh, *args)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(issue_mod, "price_fen", price_while_a_reading_lands)
            summary = issue_bills(engine, ManualClock(NOON), PERIOD, accounts=[acct])
        with engine.connect() as conn:
            bill_kwh = conn.execute(sa.select(T_BILLS.c.kwh).where(T_BILLS.c.account_no == acct)).scalar_one()
            late = conn.execute(sa.select(T_READ.c.billed).where(T_READ.c.meter_no == f"L{acct}")).scalar_one()
        other.dispose()
        engine.dispose()
    assert summary.bills == 1 and bill_kwh == kwh_before
    assert late is False or late == 0
