"""The feed's bulk-path condition asked once per distinct input (feed._SettlesMemo) answers
exactly what the allocation rule answers for every debit (feed._settles_bill), whatever the
order of the batch and however its bills share amounts, states and dates: the batch holds
pairs of debits that differ in one input only, so a key missing an input gives a cached wrong answer.
(Leaving out the tariff class or the period passes today: they change only an accrual, and a
bill that accrues is never settled by the bulk path; the key keeps them so that it stays exact.)
The memo's shortcut for a bill with nothing accrued by its accrual date is held to the rule too (the
domains put the accrual date after, on and before the fee day; reversing its date test fails)."""
from __future__ import annotations

import datetime as dt
from collections import namedtuple
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mis_adapter import feed
from mis_adapter.late_fee import RESIDENTIAL, LateFeeRates

FEE_DAY = dt.date(2026, 12, 20)
RATES = LateFeeRates()
DOMAINS: dict[str, list[Any]] = {
    "debit_fen": [4_900, 5_000, 5_100],
    "tariff_class": [RESIDENTIAL, "COMMERCIAL"],
    "period": ["202510", "202611"],
    "amount_fen": [5_000, 5_100],
    "prepaid_applied_fen": [0, 100],
    "principal_paid_fen": [0, 100],
    "accrual_micro": [0, 400_000],
    "accrual_back_days": [-3, 0, 40],
    "late_fee_paid_fen": [0, 100],
}
_inputs = st.fixed_dictionaries({k: st.sampled_from(v) for k, v in DOMAINS.items()})


@st.composite
def _pair(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Two debits whose inputs differ in one field only."""
    base = draw(_inputs)
    name = draw(st.sampled_from(sorted(DOMAINS)))
    other = draw(st.sampled_from([v for v in DOMAINS[name] if v != base[name]]))
    return draw(st.permutations([base, {**base, name: other}]))


# A bill row laid out as the feed reads it (feed._BILL_COLUMNS): the memo takes its key by position.
BillRow = namedtuple("BillRow", [c.name for c in feed._BILL_COLUMNS.selected_columns])  # type: ignore[misc]


def _debit(i: int, x: dict[str, Any]) -> tuple[feed.DebitIn, Any]:
    bill = BillRow(bill_id=1_000 + i, account_no=f"01{i:08d}", period=x["period"], amount_fen=x["amount_fen"],
                   prepaid_applied_fen=x["prepaid_applied_fen"], principal_paid_fen=x["principal_paid_fen"],
                   accrual_micro=x["accrual_micro"],
                   accrual_date=FEE_DAY - dt.timedelta(days=x["accrual_back_days"]),
                   late_fee_paid_fen=x["late_fee_paid_fen"], status="UNPAID")
    return feed.DebitIn(seq=i + 1, outcome=feed.DEBITED, bank_serial=f"S{i}", amount_fen=x["debit_fen"],
                        bill_id=bill.bill_id, account_no=f"01{i:08d}"), bill


@settings(max_examples=400, deadline=None)
@given(st.lists(_pair(), min_size=1, max_size=20))
def test_memo_answers_what_the_rule_answers_for_every_debit(pairs: list[list[dict[str, Any]]]) -> None:
    memo = feed._SettlesMemo(FEE_DAY, RATES)
    for i, x in enumerate(x for pair in pairs for x in pair):
        r, bill = _debit(i, x)
        assert memo(r, bill, x["tariff_class"]) == feed._settles_bill(r, bill, x["tariff_class"], FEE_DAY, RATES), x
