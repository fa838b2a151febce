"""Allocation of a payment (DESIGN.md Money semantics 4), pure: unpaid bills
oldest first, each bill's late fee before its principal; the remainder
becomes prepaid credit (预存). Nothing here does I/O."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from yindian_common.errors import AllocationInvariantBroken


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
    for bill in sorted(bills, key=lambda b: (b.period, b.bill_id)):
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
