"""Pay, Cancel, GetPayment and QueryAccount through a real gRPC server on
SQLite, PostgreSQL and MariaDB (DESIGN.md Money semantics 1, 2, 4, 5, 6, 9)."""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa

from mis_adapter.db.core import AllocationRow, BillRow, Customer, JournalEntry, Payment
from mis_adapter.db.recon import ReconciledDay
from tests.support.mis_data import NOON, BillSpec, RunningAdapter, add_account, add_bank, running_adapter
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.status import error_info

pytestmark = pytest.mark.migrated("mis")  # running_adapter needs the MIS schema

D = dt.date
# Three residential bills; on 2026-11-28 their fees are 640, 680 and the 100 minimum (see test_allocation).
BILLS = [BillSpec("202608", 10_000, D(2026, 9, 25)), BillSpec("202609", 20_000, D(2026, 10, 25)),
         BillSpec("202610", 15_000, D(2026, 11, 25))]
TOTAL_DUE = 45_000 + 640 + 680 + 100


@pytest.fixture
def adapter(db_url: str) -> Iterator[RunningAdapter]:
    with running_adapter(db_url) as a:
        yield a


def pay_req(serial: str, acct: str, amount: int, **kw: object) -> pb.PayRequest:
    return pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=amount, outlet_code="OUT1",
                         teller_id="T01", channel=pb.CHANNEL_COUNTER, **kw)  # type: ignore[arg-type]


def posted_payments(a: RunningAdapter, acct: str) -> list[sa.Row]:
    t = Payment.__table__
    with a.engine.connect() as conn:
        return conn.execute(sa.select(t).where(t.c.account_no == acct, t.c.state == "POSTED")).all()


def test_query_shows_arrears_fees_and_masked_name(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    r = adapter.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=adapter.md())
    assert (r.arrears_fen, r.late_fee_fen, r.total_due_fen) == (45_000, 1_420, TOTAL_DUE)
    assert [b.late_fee_fen for b in r.bills] == [640, 680, 100]
    assert r.customer_name == "张**" and r.branch_code == "01" and r.as_of_date == "2026-11-28"


def test_pay_allocates_oldest_first_fee_before_principal(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    r = adapter.stub.Pay(pay_req("P1", acct, 11_000), metadata=adapter.md())
    assert [(a.late_fee_fen, a.principal_fen) for a in r.allocations] == [(640, 10_000), (360, 0)]
    assert (r.arrears_after_fen, r.prepaid_after_fen, r.settlement_date) == (35_000, 0, "2026-11-28")
    q = adapter.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=adapter.md())
    assert q.total_due_fen == TOTAL_DUE - 11_000
    assert [b.period for b in q.bills] == ["202609", "202610"]


def test_deposit_beyond_arrears_becomes_prepaid(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    r = adapter.stub.Pay(pay_req("P1", acct, TOTAL_DUE + 580), metadata=adapter.md())
    assert r.prepaid_after_fen == 580 and r.arrears_after_fen == 0
    t = BillRow.__table__
    with adapter.engine.connect() as conn:
        assert {s for (s,) in conn.execute(sa.select(t.c.status).where(t.c.account_no == acct))} == {"PAID"}
        assert conn.execute(sa.select(Customer.__table__.c.prepaid_fen)).scalar_one() == 580


def test_partial_payments_accrue_exactly_across_days(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, [BillSpec("202610", 10_000, D(2026, 11, 1))])
    adapter.clock.set(NOON - dt.timedelta(days=17))  # 2026-11-11: 10 days overdue, fee 100
    r = adapter.stub.Pay(pay_req("P1", acct, 3_100), metadata=adapter.md())
    assert [(a.late_fee_fen, a.principal_fen) for a in r.allocations] == [(100, 3_000)]
    adapter.clock.set(NOON)  # 17 more days on 7000: 119 more
    q = adapter.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=adapter.md())
    assert (q.arrears_fen, q.late_fee_fen) == (7_000, 119)


def test_non_residential_year_boundary_through_the_service(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "02", 1, [BillSpec("202510", 100_000, D(2025, 11, 25))],
                       tariff_class="COMMERCIAL")
    adapter.clock.set(dt.datetime(2026, 1, 10, 12, 0, tzinfo=NOON.tzinfo))
    q = adapter.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=adapter.md())
    assert q.late_fee_fen == 10_200


def test_replay_100_times_applies_once_same_receipt(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    first = adapter.stub.Pay(pay_req("SER-1", acct, 20_000), metadata=adapter.md())
    for _ in range(99):
        again = adapter.stub.Pay(pay_req("SER-1", acct, 20_000), metadata=adapter.md())
        assert again == first
    assert len(posted_payments(adapter, acct)) == 1
    with pytest.raises(grpc.RpcError) as exc:
        adapter.stub.Pay(pay_req("SER-1", acct, 20_001), metadata=adapter.md())
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    q = adapter.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=adapter.md())
    assert q.total_due_fen == TOTAL_DUE - 20_000


def test_same_serial_at_another_bank_is_another_payment(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    adapter.stub.Pay(pay_req("SER-1", acct, 1_000), metadata=adapter.md("ICBC"))
    adapter.stub.Pay(pay_req("SER-1", acct, 1_000), metadata=adapter.md("ABC"))
    assert len(posted_payments(adapter, acct)) == 2


def test_50_concurrent_pays_on_one_account_add_up(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    amounts = [700 + 37 * i for i in range(50)]
    errors: list[Exception] = []
    barrier = threading.Barrier(50)

    def one(i: int) -> None:
        channel = grpc.insecure_channel(adapter.address)  # a connection of its own
        try:
            stub = billing_pb2_grpc.BillingServiceStub(channel)
            barrier.wait(timeout=30)
            stub.Pay(pay_req(f"C-{i}", acct, amounts[i]), metadata=adapter.md(), timeout=60)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)
        finally:
            channel.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    paid = sum(amounts)
    alloc, bills, cust = AllocationRow.__table__, BillRow.__table__, Customer.__table__
    with adapter.engine.connect() as conn:
        allocated = conn.execute(sa.select(sa.func.sum(alloc.c.late_fee_fen + alloc.c.principal_fen))).scalar_one()
        prepaid = conn.execute(sa.select(cust.c.prepaid_fen).where(cust.c.account_no == acct)).scalar_one()
        principal_paid, fee_paid = conn.execute(sa.select(sa.func.sum(bills.c.principal_paid_fen),
                                                          sa.func.sum(bills.c.late_fee_paid_fen))).one()
    assert allocated + prepaid == paid
    assert principal_paid + fee_paid == allocated
    q = adapter.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=adapter.md())
    assert q.arrears_fen == 45_000 - principal_paid
    assert paid > TOTAL_DUE and q.total_due_fen == 0 and q.prepaid_fen == paid - TOTAL_DUE


def test_cancel_restores_the_account_exactly(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS, prepaid_fen=0)
    before = adapter.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=adapter.md())
    adapter.stub.Pay(pay_req("P1", acct, TOTAL_DUE + 5_000), metadata=adapter.md())
    c = adapter.stub.Cancel(pb.CancelRequest(cancel_serial="X1", original_serial="P1", amount_fen=TOTAL_DUE + 5_000,
                                             reason="teller error"), metadata=adapter.md())
    assert c.outcome == pb.CANCEL_OUTCOME_REVERSED
    after = adapter.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=adapter.md())
    assert after == before
    st = adapter.stub.GetPayment(pb.GetPaymentRequest(bank_serial="P1"), metadata=adapter.md())
    assert st.state == pb.PAYMENT_STATE_REVERSED
    # replays of the cancel are idempotent; the reversed serial cannot be paid again
    again = adapter.stub.Cancel(pb.CancelRequest(cancel_serial="X1", original_serial="P1",
                                                 amount_fen=TOTAL_DUE + 5_000, reason="teller error"),
                                metadata=adapter.md())
    assert again == c
    with pytest.raises(grpc.RpcError) as exc:
        adapter.stub.Pay(pay_req("P1", acct, TOTAL_DUE + 5_000), metadata=adapter.md())
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert adapter.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=adapter.md()) == before


def test_cancel_with_wrong_amount_is_refused_and_changes_nothing(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    adapter.stub.Pay(pay_req("P1", acct, 5_000), metadata=adapter.md())
    with pytest.raises(grpc.RpcError) as exc:
        adapter.stub.Cancel(pb.CancelRequest(cancel_serial="X1", original_serial="P1", amount_fen=4_999),
                            metadata=adapter.md())
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(exc.value).metadata["field"] == "amount_fen"
    assert len(posted_payments(adapter, acct)) == 1


def test_cancel_overtaking_its_pay_leaves_a_tombstone(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    c = adapter.stub.Cancel(pb.CancelRequest(cancel_serial="X9", original_serial="LATE-1", amount_fen=5_000),
                            metadata=adapter.md())
    assert c.outcome == pb.CANCEL_OUTCOME_ORIGINAL_NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        adapter.stub.Pay(pay_req("LATE-1", acct, 5_000), metadata=adapter.md())
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    st = adapter.stub.GetPayment(pb.GetPaymentRequest(bank_serial="LATE-1"), metadata=adapter.md())
    assert st.state == pb.PAYMENT_STATE_REFUSED
    assert posted_payments(adapter, acct) == []
    again = adapter.stub.Cancel(pb.CancelRequest(cancel_serial="X9", original_serial="LATE-1", amount_fen=5_000),
                                metadata=adapter.md())
    assert again == c
    with pytest.raises(grpc.RpcError) as exc:
        adapter.stub.Cancel(pb.CancelRequest(cancel_serial="X9", original_serial="OTHER", amount_fen=5_000),
                            metadata=adapter.md())
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_cancel_of_a_reconciled_day_is_refused(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    adapter.stub.Pay(pay_req("P1", acct, 5_000), metadata=adapter.md())
    with adapter.engine.begin() as conn:
        conn.execute(sa.insert(ReconciledDay.__table__).values(bank_id="ICBC", settlement_date=D(2026, 11, 28),
                                                              reconciled_at=NOON, summary_json="{}"))
    with pytest.raises(grpc.RpcError) as exc:
        adapter.stub.Cancel(pb.CancelRequest(cancel_serial="X1", original_serial="P1", amount_fen=5_000),
                            metadata=adapter.md())
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(exc.value).reason == "DAY_RECONCILED"
    assert len(posted_payments(adapter, acct)) == 1


def test_get_payment_states(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    r = adapter.stub.Pay(pay_req("P1", acct, 5_000), metadata=adapter.md())
    st = adapter.stub.GetPayment(pb.GetPaymentRequest(bank_serial="P1"), metadata=adapter.md())
    assert st.state == pb.PAYMENT_STATE_POSTED and st.payment == r
    assert adapter.stub.GetPayment(pb.GetPaymentRequest(bank_serial="P2"), metadata=adapter.md()).state == \
        pb.PAYMENT_STATE_NOT_FOUND
    # another bank does not see ICBC's payment
    assert adapter.stub.GetPayment(pb.GetPaymentRequest(bank_serial="P1"), metadata=adapter.md("ABC")).state == \
        pb.PAYMENT_STATE_NOT_FOUND


def test_unknown_account_closed_account_unknown_and_suspended_bank(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    closed = add_account(adapter.engine, "01", 2, BILLS, status="CLOSED")
    from yindian_common.fields import make_account_no
    cases = [
        (pay_req("P1", make_account_no("01", 99), 100), adapter.md(), grpc.StatusCode.NOT_FOUND),
        (pay_req("P2", closed, 100), adapter.md(), grpc.StatusCode.FAILED_PRECONDITION),
        (pay_req("P3", acct, 100), adapter.md("NOBANK"), grpc.StatusCode.PERMISSION_DENIED),
        (pay_req("P4", acct, 100), [], grpc.StatusCode.UNAUTHENTICATED),
    ]
    for req, md, code in cases:
        with pytest.raises(grpc.RpcError) as exc:
            adapter.stub.Pay(req, metadata=md)
        assert exc.value.code() == code, req
    add_bank(adapter.engine, "BOC", suspended=True)
    with pytest.raises(grpc.RpcError) as exc:
        adapter.stub.Pay(pay_req("P5", acct, 100), metadata=adapter.md("BOC"))
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "suspended" in exc.value.details()
    # queries still answer for a suspended bank
    assert adapter.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=adapter.md("BOC")).arrears_fen
    assert posted_payments(adapter, acct) == []


def test_journal_is_appended_for_each_applied_request(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    adapter.stub.Pay(pay_req("P1", acct, 5_000), metadata=adapter.md())
    adapter.stub.Pay(pay_req("P1", acct, 5_000), metadata=adapter.md())
    adapter.stub.Cancel(pb.CancelRequest(cancel_serial="X1", original_serial="P1", amount_fen=5_000),
                        metadata=adapter.md())
    t = JournalEntry.__table__
    with adapter.engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.rpc, t.c.serial, t.c.amount_fen, t.c.outcome, t.c.bank_id)
                            .order_by(t.c.entry_id)).all()
    assert [tuple(r) for r in rows] == [("PAY", "P1", 5_000, "POSTED", "ICBC"),
                                        ("CANCEL", "X1", 5_000, "REVERSED", "ICBC")]


def test_a_pay_after_the_day_is_reconciled_settles_tomorrow(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, BILLS)
    with adapter.engine.begin() as conn:
        conn.execute(sa.insert(ReconciledDay.__table__).values(bank_id="ICBC", settlement_date=D(2026, 11, 28),
                                                              reconciled_at=NOON, summary_json="{}"))
    r = adapter.stub.Pay(pay_req("LATE", acct, TOTAL_DUE), metadata=adapter.md())
    assert r.settlement_date == "2026-11-29" and r.receipt_no.startswith("20261129")
    # late fees are still those of today
    assert sum(a.late_fee_fen for a in r.allocations) == 1_420 and r.arrears_after_fen == 0
    # another bank's day is its own
    r2 = adapter.stub.Pay(pay_req("OTHER", acct, 100), metadata=adapter.md("ABC"))
    assert r2.settlement_date == "2026-11-28"
