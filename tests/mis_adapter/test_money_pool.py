"""Pay and Cancel run on mis_adapter's money threads (--money-workers), apart from the server's
threads: a money-moving call waits for a money thread, queries do not, and a call whose deadline
passed while it waited writes nothing. And the per-bank limit of money-moving calls in progress."""
from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import sqlalchemy as sa

from mis_adapter.db.core import Customer, Payment
from tests.support.mis_data import BillSpec, RunningAdapter, add_account, running_adapter
from yindian.v1 import billing_pb2 as pb

pytestmark = pytest.mark.migrated("mis")  # running_adapter needs the MIS schema

BILLS = [BillSpec("202610", 15_000, dt.date(2026, 11, 25))]
# How long the test waits for the first pay to be seen waiting on its account's lock.
LOCK_SEEN_WITHIN_S = 20.0


def pay_req(serial: str, acct: str, amount: int) -> pb.PayRequest:
    return pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=amount, outlet_code="OUT1",
                         teller_id="T01", channel=pb.CHANNEL_COUNTER)


def _payments(a: RunningAdapter, acct: str) -> int:
    t = Payment.__table__
    with a.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(t).where(t.c.account_no == acct)).scalar_one()


def _wait_until_a_pay_waits_on_a_lock(a: RunningAdapter) -> None:
    deadline = time.monotonic() + LOCK_SEEN_WITHIN_S
    with a.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        while time.monotonic() < deadline:
            waiting = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")).scalar_one()
            if waiting:
                return
    pytest.fail("the first pay never waited on its account's lock")


@contextmanager
def _account_locked(a: RunningAdapter, acct: str) -> Iterator[sa.Connection]:
    """A transaction holding `acct`'s row lock, as a pay would (the caller rolls it back)."""
    customers = Customer.__table__
    with a.engine.connect() as holder:
        holder.begin()
        holder.execute(sa.select(customers.c.account_no).where(customers.c.account_no == acct).with_for_update())
        yield holder


def test_a_pay_waits_for_a_money_thread_while_queries_answer(pg_url: str) -> None:
    with running_adapter(pg_url, money_workers=1) as a:
        held, other = add_account(a.engine, "01", 1, BILLS), add_account(a.engine, "01", 2, BILLS)
        with _account_locked(a, held) as holder:
            first = a.stub.Pay.future(pay_req("P-HELD", held, 1_000), metadata=a.md(), timeout=30)
            _wait_until_a_pay_waits_on_a_lock(a)  # the one money thread is taken
            # Queries are served by the server's threads.
            assert a.stub.QueryAccount(pb.QueryAccountRequest(account_no=other), metadata=a.md()).arrears_fen
            # A pay on another account waits for the money thread, past its deadline.
            with pytest.raises(grpc.RpcError) as exc:
                a.stub.Pay(pay_req("P-OTHER", other, 2_000), metadata=a.md(), timeout=1.0)
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            holder.rollback()
        assert first.result().amount_fen == 1_000
        # The expired pay wrote nothing; sent again, it posts once.
        assert a.stub.GetPayment(pb.GetPaymentRequest(bank_serial="P-OTHER"), metadata=a.md()).state == \
            pb.PAYMENT_STATE_NOT_FOUND
        assert _payments(a, other) == 0
        assert a.stub.Pay(pay_req("P-OTHER", other, 2_000), metadata=a.md(), timeout=30).amount_fen == 2_000
        assert _payments(a, other) == 1 and _payments(a, held) == 1


def test_a_bank_past_its_concurrency_limit_is_refused_and_another_bank_is_not(pg_url: str) -> None:
    with running_adapter(pg_url, bank_concurrency_max=1) as a:
        held, other = add_account(a.engine, "01", 1, BILLS), add_account(a.engine, "01", 2, BILLS)
        with _account_locked(a, held) as holder:
            first = a.stub.Pay.future(pay_req("P-HELD", held, 1_000), metadata=a.md(), timeout=30)
            _wait_until_a_pay_waits_on_a_lock(a)  # ICBC's one call in progress
            with pytest.raises(grpc.RpcError) as exc:
                a.stub.Pay(pay_req("P-OVER", other, 2_000), metadata=a.md(), timeout=30)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert a.stub.Pay(pay_req("P-ABC", other, 3_000), metadata=a.md("ABC"), timeout=30).amount_fen == 3_000
            holder.rollback()
        assert first.result().amount_fen == 1_000
        # The slot is given back: ICBC pays again.
        assert a.stub.Pay(pay_req("P-OVER", other, 2_000), metadata=a.md(), timeout=30).amount_fen == 2_000
        assert _payments(a, other) == 2
