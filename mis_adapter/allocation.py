"""Allocation of a payment (DESIGN.md Money semantics 4), pure: unpaid bills
oldest first, each bill's late fee before its principal; the remainder
becomes prepaid credit (预存). Also the rules around it, each written once:
what is due on a bill (`bills_due`, `fee_state`), the status a bill gets
(`bill_status`) and the settlement date of a payment (`settlement_date`).
Pay (payments.py), the feed's bulk path (feed.py) and reconciliation all
call these. Nothing here does I/O."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mis_adapter.late_fee import FeeState, LateFeeRates, accrual_as_of, fee_from_micro
from yindian_common.errors import AllocationInvariantBroken, DayClosed

ONE_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class BillDue:
    bill_id: int
    period: str
    late_fee_due_fen: int
    principal_due_fen: int


@dataclass(frozen=True)
class Allocation:
    bill_id: int
    late_fee_fen: int
    principal_fen: int


@dataclass(frozen=True)
class AllocationPlan:
    allocations: tuple[Allocation, ...]
    prepaid_fen: int


def allocate_payment(amount_fen: int, bills: Sequence[BillDue]) -> AllocationPlan:
    """`bills` must be the account's unpaid bills; they are settled oldest first."""
    remaining = amount_fen
    out: list[Allocation] = []
    ordered = bills if len(bills) < 2 else sorted(bills, key=lambda b: (b.period, b.bill_id))
    for bill in ordered:
        if remaining == 0:
            break
        fee = min(remaining, bill.late_fee_due_fen)
        remaining -= fee
        principal = min(remaining, bill.principal_due_fen)
        remaining -= principal
        if fee or principal:
            out.append(Allocation(bill.bill_id, fee, principal))
    plan = AllocationPlan(tuple(out), remaining)
    total = sum(a.late_fee_fen + a.principal_fen for a in plan.allocations) + plan.prepaid_fen
    if total != amount_fen or plan.prepaid_fen < 0:
        raise AllocationInvariantBroken(f"allocations {total} != payment {amount_fen}")
    return plan


# ---- what is due, and what a bill becomes ----
def fee_state(row: Any, tariff_class: str) -> FeeState:
    """A bill row's fee state (row: amount_fen, prepaid_applied_fen, principal_paid_fen,
    accrual_micro, accrual_date, late_fee_paid_fen, period)."""
    return FeeState(principal_unpaid_fen=row.amount_fen - row.prepaid_applied_fen - row.principal_paid_fen,
                    accrual_micro=row.accrual_micro, accrual_date=row.accrual_date,
                    late_fee_paid_fen=row.late_fee_paid_fen, tariff_class=tariff_class,
                    bill_year=int(row.period[:4]))


def bill_status(amount_fen: int, prepaid_applied: int, principal_paid: int, fee_paid: int) -> str:
    if prepaid_applied + principal_paid >= amount_fen:
        return "PAID"
    return "PARTIAL" if principal_paid or fee_paid or prepaid_applied else "UNPAID"


def bills_due(rows: Sequence[Any], tariff_class: str, as_of: dt.date, rates: LateFeeRates
              ) -> list[tuple[Any, BillDue, int]]:
    """(row, what is due on it as of `as_of`, its accrual micro as of then), in the rows' order."""
    out = []
    for row in rows:
        st = fee_state(row, tariff_class)
        micro = accrual_as_of(st, as_of, rates)
        fee_due = max(0, fee_from_micro(micro, rates) - st.late_fee_paid_fen)
        out.append((row, BillDue(row.bill_id, row.period, fee_due, st.principal_unpaid_fen), micro))
    return out


# ---- the settlement date ----
def settlement_date(today: dt.date, *, today_reconciled: bool, next_reconciled: bool,
                    signed_off: bool = False) -> dt.date:
    """A payment posted today settles today, or tomorrow once the bank's today
    is reconciled or the bank signed off today (日终签退: it closed its books for
    the day); refused (DayClosed) when tomorrow is reconciled as well. Late fees
    still accrue to today whatever the settlement date."""
    if not today_reconciled and not signed_off:
        return today
    if next_reconciled:
        raise DayClosed(f"settlement dates {today} and {today + ONE_DAY} are both closed for this bank")
    return today + ONE_DAY
