"""The feed posts a batch after one read of its accounts' unpaid bills and its own bills
(feed._batch_bills). Whatever the accounts' bills and their states, that read answers exactly
what the two reads it replaced answer: every bill of the batch by id, and per account the number
of bills not PAID (the bulk path settles a debit only on an account's one unpaid bill)."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import feed
from mis_adapter.db.core import BillRow, Customer
from mis_adapter.migrate import upgrade
from tests.support.mis_data import add_account
from yindian_common.bulk_sql import list_param
from yindian_common.db import make_engine

PERIODS = ["202608", "202609", "202610", "202611"]
STATUSES = ["UNPAID", "PARTIAL", "PAID"]
DUE = dt.date(2026, 12, 1)

# per account: the states of its bills (one per period, oldest first)
_accounts = st.lists(st.lists(st.sampled_from(STATUSES), min_size=1, max_size=len(PERIODS)), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accounts=_accounts, data=st.data())
def test_one_read_answers_what_the_two_reads_answered(db_url: str, accounts: list[list[str]],
                                                      data: st.DataObject) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.delete(BillRow.__table__))
            conn.execute(sa.delete(Customer.__table__))
        bills: list[tuple[int, str]] = []
        for i, states in enumerate(accounts):
            acct = add_account(engine, "01", i + 1)
            with engine.begin() as conn:
                for period, status in zip(PERIODS, states, strict=False):
                    bill_id = conn.execute(sa.insert(BillRow.__table__).values(
                        account_no=acct, period=period, kwh=100, amount_fen=5_000, prepaid_applied_fen=0,
                        principal_paid_fen=5_000 if status == "PAID" else 1_000 if status == "PARTIAL" else 0,
                        late_fee_paid_fen=0, accrual_micro=0, accrual_date=DUE, due_date=DUE,
                        issued_at=dt.datetime(2026, 11, 1, tzinfo=dt.UTC), status=status,
                        paid_on=DUE if status == "PAID" else None, dunning=False)
                    ).inserted_primary_key[0]
                    bills.append((int(bill_id), acct))
        batch = data.draw(st.lists(st.sampled_from(bills), min_size=1, unique=True))
        # a result may name another account than its bill's (a notice that went wrong): read by id all the same
        other = data.draw(st.sampled_from([a for _, a in bills]))
        named = data.draw(st.lists(st.booleans(), min_size=len(batch), max_size=len(batch)))
        results = [feed.DebitIn(i + 1, feed.DEBITED, f"S{i}", 5_000, bill_id, other if wrong else acct)
                   for i, ((bill_id, acct), wrong) in enumerate(zip(batch, named, strict=True))]
        with engine.connect() as conn:
            got_bills, got_unpaid = feed._batch_bills(conn, results)
            want_bills = {r.bill_id: r for r in conn.execute(
                feed._BILLS, {"ids": list_param(conn, sorted({r.bill_id for r in results}))})}
            want_unpaid = {r.account_no: r.n for r in conn.execute(
                feed._UNPAID_BY_ACCOUNT, {"accts": list_param(conn, sorted({r.account_no for r in results}))})}
        assert {k: tuple(v) for k, v in got_bills.items()} == {k: tuple(v) for k, v in want_bills.items()}
        assert got_unpaid == want_unpaid
    finally:
        engine.dispose()
