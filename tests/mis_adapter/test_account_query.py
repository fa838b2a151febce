"""QueryAccount's one-statement read (mis_adapter/account_query.py) against
the reference it replaces on the wire (payments.query_account: the customer
and its unpaid bills read by two statements in one transaction, the figures
by the one rule), on all three back ends; and, on PostgreSQL, queries that
leave the pays' prepared statements in place."""
from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import account_query, payments
from mis_adapter.allocation import bill_status
from mis_adapter.context import AdapterContext
from mis_adapter.db.core import BillRow
from mis_adapter.migrate import upgrade
from mis_adapter.payments import PayCommand
from mis_adapter.settings import AdapterSettings
from tests.support.databases import fresh_database
from tests.support.mis_data import NOON, BillSpec, add_account, add_bank, pay_read_prepared
from yindian_common.clock import ManualClock
from yindian_common.errors import AccountNotFound
from yindian_common.fields import make_account_no
from yindian_common.settings import load_settings

D = dt.date
_serials = itertools.count(1)


@pytest.fixture
def ctx(db_url: str) -> Iterator[AdapterContext]:
    c = AdapterContext.build(load_settings(AdapterSettings, {"db": db_url, "insecure": True}), ManualClock(NOON))
    try:
        upgrade(c.router.primary)
        add_bank(c.router.primary, "ICBC")
        yield c
    finally:
        c.close()


_bill = st.tuples(st.integers(1, 200_000),                      # amount
                  st.integers(-400, 60),                        # due date, days from today
                  st.integers(0, 100), st.integers(0, 100),     # principal paid, prepaid applied (% of amount)
                  st.integers(0, 3_000))                        # late fee paid


def _add(engine: sa.Engine, bills: list[tuple[int, int, int, int, int]], tariff_class: str, status: str,
         prepaid_fen: int) -> str:
    acct = add_account(engine, "01", next(_serials), tariff_class=tariff_class, status=status,
                       prepaid_fen=prepaid_fen)
    today = NOON.date()
    rows = []
    for i, (amount, due_days, paid_pct, prepaid_pct, fee_paid) in enumerate(bills):
        prepaid_applied = min(amount, amount * prepaid_pct // 100)
        principal_paid = min(amount - prepaid_applied, amount * paid_pct // 100)
        due = today + dt.timedelta(days=due_days)
        status_now = bill_status(amount, prepaid_applied, principal_paid, fee_paid)
        rows.append(dict(account_no=acct, period=f"{2024 + i // 12}{i % 12 + 1:02d}", kwh=100 + i, amount_fen=amount,
                         prepaid_applied_fen=prepaid_applied, principal_paid_fen=principal_paid,
                         late_fee_paid_fen=fee_paid, accrual_micro=0, accrual_date=due, due_date=due,
                         issued_at=NOON - dt.timedelta(days=40), status=status_now,
                         paid_on=today if status_now == "PAID" else None, dunning=False))
    if rows:
        with engine.begin() as conn:
            conn.execute(sa.insert(BillRow.__table__), rows)
    return acct


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bills=st.lists(_bill, max_size=14), tariff_class=st.sampled_from(["RESIDENTIAL", "COMMERCIAL"]),
       status=st.sampled_from(["OPEN", "OPEN", "CLOSED"]), prepaid_fen=st.sampled_from([0, 0, 1, 12_345]),
       days_later=st.integers(0, 500), bills_max=st.sampled_from([1, 3, 120]))
def test_the_one_statement_answers_what_the_reference_answers(
        ctx: AdapterContext, bills: list[tuple[int, int, int, int, int]], tariff_class: str, status: str,
        prepaid_fen: int, days_later: int, bills_max: int) -> None:
    """Paid bills left out, unpaid and partial ones in period order with their late fees as of the
    clock's day, totals over all of them, at most query_bills_max listed, the name masked, closed."""
    assert isinstance(ctx.clock, ManualClock)
    ctx.clock.set(NOON)
    acct = _add(ctx.router.primary, bills, tariff_class, status, prepaid_fen)
    ctx.clock.set(NOON + dt.timedelta(days=days_later))
    ctx.settings = ctx.settings.model_copy(update={"query_bills_max": bills_max})
    assert account_query.query_account(ctx, acct) == payments.query_account(ctx, acct)


def test_an_account_without_unpaid_bills_and_an_unknown_one(ctx: AdapterContext) -> None:
    engine = ctx.router.primary
    acct = add_account(engine, "01", 900_001, prepaid_fen=777)
    v = account_query.query_account(ctx, acct)
    assert (v.arrears_fen, v.late_fee_fen, v.total_due_fen, v.prepaid_fen, v.bills, v.closed) == (0, 0, 0, 777, (),
                                                                                                   False)
    assert v.customer_name == "张**" and v.branch_code == "01"
    with pytest.raises(AccountNotFound):
        account_query.query_account(ctx, make_account_no("01", 900_002))


def test_queries_keep_the_pays_prepared_statements(tmp_path: Path) -> None:
    """QueryAccount shares the pays' pool. psycopg forgets every statement it prepared on a
    connection at a ROLLBACK (DEALLOCATE ALL): queries, known and unknown accounts alike, must end
    without one, so the pays on that connection stay prepared."""
    with fresh_database("postgresql", tmp_path) as url:
        c = AdapterContext.build(load_settings(AdapterSettings, {"db": url, "insecure": True, "db_pool_size": 2}),
                                 ManualClock(NOON))
        try:
            engine = c.router.primary
            upgrade(engine)
            add_bank(engine, "ICBC")
            acct = add_account(engine, "01", 1, [BillSpec("202611", 150_000, D(2026, 12, 25))])


            for k in range(6):
                payments.pay(c, PayCommand("ICBC", f"P-{k}", acct, 1_000, "O", "T"))
            assert pay_read_prepared(engine) == 1
            for _ in range(3):
                assert account_query.query_account(c, acct).arrears_fen == 150_000 - 6_000
                with pytest.raises(AccountNotFound):
                    account_query.query_account(c, make_account_no("01", 2))
            assert pay_read_prepared(engine) == 1
        finally:
            c.close()
