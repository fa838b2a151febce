"""What a new payment changes, pure: from the account's unpaid bill rows (in
period order), its tariff class and prepaid credit, the allocation of
`allocation.allocate_payment` and, for each bill it touches, the bill's new
paid amounts, accrual and status (`allocation.bill_status`). Pay's fast
statement (pay_pg.py), its portable path and the feed and reconciliation
writers (payments.post_payment_in_tx) all write exactly this. No I/O."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mis_adapter.allocation import AllocationPlan, allocate_payment, bill_status, bills_due
from mis_adapter.late_fee import LateFeeRates


@dataclass(frozen=True)
class BillUpdate:
    bill_id: int
    principal_paid_fen: int
    late_fee_paid_fen: int
    accrual_micro: int
    accrual_date: dt.date
    status: str
    paid_on: dt.date | None


@dataclass(frozen=True)
class PaymentEffects:
    plan: AllocationPlan
    bill_updates: tuple[BillUpdate, ...]
    arrears_after_fen: int
    prepaid_after_fen: int


def payment_effects(amount_fen: int, rows: Sequence[Any], tariff_class: str, prepaid_fen: int, day: dt.date,
                    rates: LateFeeRates) -> PaymentEffects:
    """`rows`: the account's unpaid bills (bill_id, period, amount_fen, prepaid_applied_fen,
    principal_paid_fen, late_fee_paid_fen, accrual_micro, accrual_date), late fees as of `day`."""
    due = bills_due(rows, tariff_class, day, rates)
    plan = allocate_payment(amount_fen, [d for _, d, _ in due])
    by_id = {d.bill_id: (row, micro) for row, d, micro in due}
    updates = []
    for a in plan.allocations:
        row, micro = by_id[a.bill_id]
        principal_paid = row.principal_paid_fen + a.principal_fen
        fee_paid = row.late_fee_paid_fen + a.late_fee_fen
        status = bill_status(row.amount_fen, row.prepaid_applied_fen, principal_paid, fee_paid)
        updates.append(BillUpdate(a.bill_id, principal_paid, fee_paid, micro, max(day, row.accrual_date), status,
                                  day if status == "PAID" else None))
    arrears_after = sum(d.principal_due_fen for _, d, _ in due) - sum(a.principal_fen for a in plan.allocations)
    return PaymentEffects(plan, tuple(updates), arrears_after, prepaid_fen + plan.prepaid_fen)
