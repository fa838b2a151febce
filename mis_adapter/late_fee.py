"""Late fees (违约金), DESIGN.md Money semantics 5, as pure functions.

A bill's late fee accrues daily, from the day after its due date, on its
unpaid principal: residential customers 0.1 %/day; other customers 0.2 %/day
for days that fall in the bill's own year (current-year arrears) and
0.3 %/day for days in any later year (arrears carried across a year end).
Once any fee has accrued it is at least 1 yuan. Results are integer fen,
rounded half up, from an exact integer accrual kept in millionths of a fen
("micro"), so that partial payments at different dates never round twice.

Rates are parts per million per day and come from configuration.
Nothing here does I/O."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

MICRO_PER_FEN = 1_000_000
RESIDENTIAL = "RESIDENTIAL"


@dataclass(frozen=True)
class LateFeeRates:
    residential_ppm_per_day: int = 1_000
    other_current_year_ppm_per_day: int = 2_000
    other_earlier_years_ppm_per_day: int = 3_000
    minimum_fen: int = 100


def accrued_micro(principal_fen: int, from_date: dt.date, to_date: dt.date, *, tariff_class: str,
                  bill_year: int, rates: LateFeeRates) -> int:
    """Fee accrued on `principal_fen` for the days after `from_date` up to and
    including `to_date`, in millionths of a fen."""
    if principal_fen <= 0 or to_date <= from_date:
        return 0
    days = (to_date - from_date).days
    if tariff_class == RESIDENTIAL:
        return principal_fen * days * rates.residential_ppm_per_day
    # Days up to 31 December of the bill's year are current-year arrears.
    year_end = dt.date(bill_year, 12, 31)
    current_days = max(0, min(to_date, year_end).toordinal() - from_date.toordinal())
    later_days = days - current_days
    return principal_fen * (current_days * rates.other_current_year_ppm_per_day
                            + later_days * rates.other_earlier_years_ppm_per_day)


def fee_from_micro(micro: int, rates: LateFeeRates) -> int:
    """Total fee in fen for an accrual: rounded half up, at least the minimum once any accrued."""
    if micro <= 0:
        return 0
    return max(rates.minimum_fen, (micro + MICRO_PER_FEN // 2) // MICRO_PER_FEN)


@dataclass(frozen=True)
class FeeState:
    """What a bill row says about its fee: accrual so far and what was paid."""
    principal_unpaid_fen: int
    accrual_micro: int
    accrual_date: dt.date
    late_fee_paid_fen: int
    tariff_class: str
    bill_year: int


def accrual_as_of(state: FeeState, as_of: dt.date, rates: LateFeeRates) -> int:
    """The bill's exact accrual (micro) through `as_of`."""
    return state.accrual_micro + accrued_micro(state.principal_unpaid_fen, state.accrual_date, as_of,
                                               tariff_class=state.tariff_class, bill_year=state.bill_year,
                                               rates=rates)


def late_fee_due(state: FeeState, as_of: dt.date, rates: LateFeeRates) -> int:
    """Late fee still owed on the bill at the end of `as_of`, in fen."""
    return max(0, fee_from_micro(accrual_as_of(state, as_of, rates), rates) - state.late_fee_paid_fen)
