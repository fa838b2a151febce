"""Allocation rules (DESIGN.md Money semantics 4): oldest first, fee before principal, rest prepaid."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mis_adapter.allocation import Allocation, BillDue, allocate_payment

BILLS = [BillDue(2, "202609", 680, 20_000), BillDue(1, "202608", 640, 10_000), BillDue(3, "202610", 100, 15_000)]


def test_oldest_first_fee_before_principal() -> None:
    plan = allocate_payment(11_000, BILLS)
    assert plan.allocations == (Allocation(1, 640, 10_000), Allocation(2, 360, 0))
    assert plan.prepaid_fen == 0


def test_remainder_becomes_prepaid() -> None:
    plan = allocate_payment(47_000, BILLS)
    assert plan.allocations == (Allocation(1, 640, 10_000), Allocation(2, 680, 20_000), Allocation(3, 100, 15_000))
    assert plan.prepaid_fen == 580


def test_no_bills_all_prepaid() -> None:
    plan = allocate_payment(5_000, [])
    assert plan.allocations == () and plan.prepaid_fen == 5_000


@given(st.integers(1, 10**9), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**7)), max_size=20))
def test_allocations_always_add_up(amount: int, dues: list[tuple[int, int]]) -> None:
    bills = [BillDue(i, f"2026{i:02d}", fee, principal) for i, (fee, principal) in enumerate(dues)]
    plan = allocate_payment(amount, bills)
    assert sum(a.late_fee_fen + a.principal_fen for a in plan.allocations) + plan.prepaid_fen == amount
    by_id = {b.bill_id: b for b in bills}
    for a in plan.allocations:
        assert a.late_fee_fen <= by_id[a.bill_id].late_fee_due_fen
        assert a.principal_fen <= by_id[a.bill_id].principal_due_fen
        # principal is only touched once the fee is settled
        assert a.principal_fen == 0 or a.late_fee_fen == by_id[a.bill_id].late_fee_due_fen
    if plan.prepaid_fen:
        assert sum(b.late_fee_due_fen + b.principal_due_fen for b in bills) + plan.prepaid_fen == amount


def test_settlement_date_rule() -> None:
    import datetime as dt

    import pytest

    from mis_adapter.allocation import settlement_date
    from yindian_common.errors import DayClosed

    day = dt.date(2026, 11, 29)
    assert settlement_date(day, today_reconciled=False, next_reconciled=False) == day
    assert settlement_date(day, today_reconciled=False, next_reconciled=True) == day
    assert settlement_date(day, today_reconciled=True, next_reconciled=False) == dt.date(2026, 11, 30)
    with pytest.raises(DayClosed):
        settlement_date(day, today_reconciled=True, next_reconciled=True)


def test_bill_status_and_what_is_due() -> None:
    import datetime as dt
    from types import SimpleNamespace

    from mis_adapter.allocation import bill_status, bills_due
    from mis_adapter.late_fee import LateFeeRates

    assert bill_status(10_000, 0, 0, 0) == "UNPAID"
    assert bill_status(10_000, 0, 0, 100) == "PARTIAL"
    assert bill_status(10_000, 2_000, 0, 0) == "PARTIAL"
    assert bill_status(10_000, 2_000, 8_000, 0) == "PAID"
    row = SimpleNamespace(bill_id=7, period="202610", amount_fen=10_000, prepaid_applied_fen=1_000,
                          principal_paid_fen=0, accrual_micro=0, accrual_date=dt.date(2026, 11, 18),
                          late_fee_paid_fen=0)
    rates = LateFeeRates()
    ((_, on_time, micro0),) = bills_due([row], "RESIDENTIAL", dt.date(2026, 11, 18), rates)
    assert (on_time.late_fee_due_fen, on_time.principal_due_fen, micro0) == (0, 9_000, 0)
    # ten days late, residential 1000 ppm/day on 9,000 fen = 90 fen, raised to the 100 fen minimum
    ((_, late, micro),) = bills_due([row], "RESIDENTIAL", dt.date(2026, 11, 28), rates)
    assert (late.late_fee_due_fen, late.principal_due_fen, micro) == (100, 9_000, 9_000 * 10 * 1_000)
