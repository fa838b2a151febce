"""Late-fee cases worked out by hand (DESIGN.md Money semantics 5)."""
from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mis_adapter.late_fee import FeeState, LateFeeRates, accrued_micro, fee_from_micro, late_fee_due

RATES = LateFeeRates()
D = dt.date


def fee(principal: int, due: dt.date, as_of: dt.date, cls: str = "RESIDENTIAL", year: int | None = None) -> int:
    st_ = FeeState(principal, 0, due, 0, cls, year or due.year)
    return late_fee_due(st_, as_of, RATES)


def test_residential_one_per_mille_a_day() -> None:
    # 100.00 yuan, 27 days overdue: 10000 * 27 * 0.001 = 270 fen
    assert fee(10_000, D(2026, 11, 1), D(2026, 11, 28)) == 270


def test_nothing_accrues_on_or_before_the_due_date() -> None:
    assert fee(10_000, D(2026, 11, 28), D(2026, 11, 28)) == 0
    assert fee(10_000, D(2026, 11, 28), D(2026, 11, 1)) == 0


def test_minimum_one_yuan_once_any_accrues() -> None:
    # 50 yuan, 3 days: 15 fen accrued, charged 1 yuan
    assert fee(5_000, D(2026, 11, 25), D(2026, 11, 28)) == 100


def test_other_customers_two_per_mille_in_the_bills_year() -> None:
    # commercial 1,000 yuan, 10 days in its own year: 100000 * 10 * 0.002 = 2000 fen
    assert fee(100_000, D(2026, 10, 25), D(2026, 11, 4), "COMMERCIAL") == 2_000


def test_year_boundary_three_per_mille_for_days_in_later_years() -> None:
    # 2025 bill due 2025-11-25, as of 2026-01-10: 36 days of 2025 at 0.2 %, 10 days of 2026 at 0.3 %
    # 100000 * (36*0.002 + 10*0.003) = 7200 + 3000 = 10200 fen
    assert fee(100_000, D(2025, 11, 25), D(2026, 1, 10), "INDUSTRIAL", 2025) == 10_200
    # residential customers pay 0.1 % whatever the year: 46 days
    assert fee(100_000, D(2025, 11, 25), D(2026, 1, 10), "RESIDENTIAL", 2025) == 4_600


def test_rounding_half_up() -> None:
    # 100250 fen * 1 day * 0.002 = 200.5 fen -> 201; 100249 -> 200.498 -> 200
    assert fee(100_250, D(2026, 11, 27), D(2026, 11, 28), "COMMERCIAL") == 201
    assert fee(100_249, D(2026, 11, 27), D(2026, 11, 28), "COMMERCIAL") == 200


def test_partial_payment_accrual_is_exact() -> None:
    # 10000 fen due 11-01; on 11-11 100 fen of fee accrued and was paid with 3000 of principal;
    # 7000 then accrues for 17 days: total 100 + 119 = 219, of which 119 still due.
    micro = accrued_micro(10_000, D(2026, 11, 1), D(2026, 11, 11), tariff_class="RESIDENTIAL", bill_year=2026,
                          rates=RATES)
    assert micro == 100_000_000
    later = FeeState(7_000, micro, D(2026, 11, 11), 100, "RESIDENTIAL", 2026)
    assert late_fee_due(later, D(2026, 11, 28), RATES) == 119


def test_rates_are_configuration() -> None:
    rates = LateFeeRates(residential_ppm_per_day=500, minimum_fen=0)
    st_ = FeeState(10_000, 0, D(2026, 11, 1), 0, "RESIDENTIAL", 2026)
    assert late_fee_due(st_, D(2026, 11, 28), rates) == 135


@given(st.integers(1, 10**9), st.integers(1, 3650), st.sampled_from(["RESIDENTIAL", "COMMERCIAL"]))
def test_fee_never_negative_and_monotonic_in_time(principal: int, days: int, cls: str) -> None:
    due = D(2020, 6, 30)
    a = fee(principal, due, due + dt.timedelta(days=days), cls)
    b = fee(principal, due, due + dt.timedelta(days=days + 1), cls)
    assert 100 <= a <= b


@pytest.mark.parametrize("micro,expected", [(0, 0), (1, 100), (99_499_999, 100), (150_500_000, 151),
                                            (150_499_999, 150)])
def test_fee_from_micro(micro: int, expected: int) -> None:
    assert fee_from_micro(micro, RATES) == expected
