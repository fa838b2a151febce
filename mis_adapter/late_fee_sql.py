"""The late-fee rule of late_fee.py (`late_fee_due` on a bill's FeeState) as
one SQL expression, so that a report can price and add up the bills in
arrears inside the database instead of fetching each one into Python.

The same integer arithmetic, step for step: whole days after the accrual
date up to the as-of date (none when the as-of date is not later), split at
31 December of the bill's year for non-residential customers, accrued in
millionths of a fen, rounded half up with integer division, at least the
minimum once any accrued, less what was paid, never below zero. Property-
tested equal to late_fee.py on every back end (tests/mis_adapter/
test_late_fee_sql.py). Dialect differences (date difference, integer
division, a date from a period) are compiled per back end here and nowhere
else. Builds expressions only; runs nothing."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from mis_adapter.late_fee import MICRO_PER_FEN, RESIDENTIAL, LateFeeRates

__all__ = ["accrual_micro_sql", "accrued_micro_sql", "fee_due_from_micro_sql", "late_fee_due_sql"]


class _DaysBetween(FunctionElement[int]):
    """Whole days from `earlier` to `later` (negative when later is before)."""
    type = sa.BigInteger()
    inherit_cache = True
    name = "days_between"


@compiles(_DaysBetween, "postgresql")
def _days_pg(el: _DaysBetween, compiler: Any, **kw: Any) -> str:
    later, earlier = (compiler.process(c, **kw) for c in el.clauses)
    return f"(CAST({later} AS DATE) - CAST({earlier} AS DATE))"


@compiles(_DaysBetween, "sqlite")
def _days_sqlite(el: _DaysBetween, compiler: Any, **kw: Any) -> str:
    later, earlier = (compiler.process(c, **kw) for c in el.clauses)
    return f"CAST(round(julianday({later}) - julianday({earlier})) AS INTEGER)"


@compiles(_DaysBetween)
def _days_other(el: _DaysBetween, compiler: Any, **kw: Any) -> str:
    later, earlier = (compiler.process(c, **kw) for c in el.clauses)
    return f"DATEDIFF({later}, {earlier})"


class _IntDiv(FunctionElement[int]):
    """Integer division of non-negative integers (truncating)."""
    type = sa.BigInteger()
    inherit_cache = True
    name = "int_div"


@compiles(_IntDiv)
def _div_default(el: _IntDiv, compiler: Any, **kw: Any) -> str:
    a, b = (compiler.process(c, **kw) for c in el.clauses)
    return f"(({a}) / ({b}))"  # integer / integer truncates on SQLite


@compiles(_IntDiv, "postgresql")
def _div_pg(el: _IntDiv, compiler: Any, **kw: Any) -> str:
    a, b = (compiler.process(c, **kw) for c in el.clauses)
    # a parameter may arrive as numeric: force bigint so that `/` truncates
    return f"(CAST({a} AS BIGINT) / CAST({b} AS BIGINT))"


@compiles(_IntDiv, "mysql")
@compiles(_IntDiv, "mariadb")
def _div_mysql(el: _IntDiv, compiler: Any, **kw: Any) -> str:
    a, b = (compiler.process(c, **kw) for c in el.clauses)
    return f"(({a}) DIV ({b}))"  # `/` gives a DECIMAL rounded to div_precision_increment


class _YearEnd(FunctionElement[Any]):
    """31 December of the year a period (YYYYMM) names, as a date."""
    type = sa.Date()
    inherit_cache = True
    name = "year_end"


@compiles(_YearEnd, "postgresql")
def _ye_pg(el: _YearEnd, compiler: Any, **kw: Any) -> str:
    (period,) = (compiler.process(c, **kw) for c in el.clauses)
    return f"make_date(CAST(substr({period}, 1, 4) AS INTEGER), 12, 31)"


@compiles(_YearEnd)
def _ye_other(el: _YearEnd, compiler: Any, **kw: Any) -> str:
    (period,) = (compiler.process(c, **kw) for c in el.clauses)
    return f"(substr({period}, 1, 4) || '-12-31')" if compiler.dialect.name == "sqlite" \
        else f"CAST(CONCAT(SUBSTR({period}, 1, 4), '-12-31') AS DATE)"


class _Greatest(FunctionElement[int]):
    """The larger of two non-NULL integers, each expression evaluated once (a CASE
    would repeat the larger one's expression, and the fee's is long)."""
    type = sa.BigInteger()
    inherit_cache = True
    name = "greatest"


@compiles(_Greatest)
def _greatest_default(el: _Greatest, compiler: Any, **kw: Any) -> str:
    a, b = (compiler.process(c, **kw) for c in el.clauses)
    return f"GREATEST({a}, {b})"


@compiles(_Greatest, "sqlite")
def _greatest_sqlite(el: _Greatest, compiler: Any, **kw: Any) -> str:
    a, b = (compiler.process(c, **kw) for c in el.clauses)
    return f"max({a}, {b})"  # scalar max of two arguments


class _LeastDate(FunctionElement[Any]):
    """The earlier of two dates."""
    type = sa.Date()
    inherit_cache = True
    name = "least_date"


@compiles(_LeastDate)
def _least_date_default(el: _LeastDate, compiler: Any, **kw: Any) -> str:
    a, b = (compiler.process(c, **kw) for c in el.clauses)
    return f"LEAST({a}, {b})"


@compiles(_LeastDate, "sqlite")
def _least_date_sqlite(el: _LeastDate, compiler: Any, **kw: Any) -> str:
    a, b = (compiler.process(c, **kw) for c in el.clauses)
    return f"min({a}, {b})"  # ISO dates as text: the earlier is the smaller string


def _at_least_zero(x: ColumnElement[Any]) -> ColumnElement[Any]:
    return _Greatest(x, sa.literal(0, sa.BigInteger()))


def accrued_micro_sql(*, principal: ColumnElement[Any], from_date: ColumnElement[Any],
                      to_date: ColumnElement[Any], tariff_class: ColumnElement[Any], period: ColumnElement[Any],
                      rates: LateFeeRates) -> ColumnElement[Any]:
    """late_fee.accrued_micro(principal, from_date, to_date, ...) as an expression: the fee accrued on
    `principal` for the days after `from_date` up to and including `to_date`, in millionths of a fen.

    Each input is written once (no database here shares a repeated subexpression, and the
    principal and the dates are themselves expressions in the reports): no days accrue on a
    principal at or below zero (greatest(principal, 0)) nor when to_date is not later
    (greatest(days, 0); the current-year days are then zero too), and the non-residential rule
    current x rate_c + (days - current) x rate_e is days x rate_e + current x (rate_c - rate_e),
    with current = max(0, min(to_date, 31 Dec) - from_date)."""
    principal_or_zero = _at_least_zero(principal)
    days = _at_least_zero(_DaysBetween(to_date, from_date))
    current_days = _at_least_zero(_DaysBetween(_LeastDate(to_date, _YearEnd(period)), from_date))
    residential = principal_or_zero * days * rates.residential_ppm_per_day
    other = principal_or_zero * (days * rates.other_earlier_years_ppm_per_day
                                 + current_days * (rates.other_current_year_ppm_per_day
                                                   - rates.other_earlier_years_ppm_per_day))
    return sa.case((tariff_class == RESIDENTIAL, residential), else_=other)


def late_fee_due_sql(*, principal_unpaid: ColumnElement[Any], accrual_micro: ColumnElement[Any],
                     accrual_date: ColumnElement[Any], late_fee_paid: ColumnElement[Any],
                     tariff_class: ColumnElement[Any], period: ColumnElement[Any], as_of: ColumnElement[Any],
                     rates: LateFeeRates) -> ColumnElement[Any]:
    """late_fee.late_fee_due(FeeState(...), as_of, rates) as an expression."""
    micro = accrual_micro_sql(principal_unpaid=principal_unpaid, accrual_micro=accrual_micro,
                              accrual_date=accrual_date, tariff_class=tariff_class, period=period, as_of=as_of,
                              rates=rates)
    return fee_due_from_micro_sql(micro, late_fee_paid, rates)


def accrual_micro_sql(*, principal_unpaid: ColumnElement[Any], accrual_micro: ColumnElement[Any],
                      accrual_date: ColumnElement[Any], tariff_class: ColumnElement[Any], period: ColumnElement[Any],
                      as_of: ColumnElement[Any], rates: LateFeeRates) -> ColumnElement[Any]:
    """late_fee.accrual_as_of(FeeState(...), as_of, rates) as an expression: the exact accrual in micro."""
    return accrual_micro + accrued_micro_sql(principal=principal_unpaid, from_date=accrual_date, to_date=as_of,
                                             tariff_class=tariff_class, period=period, rates=rates)


def fee_due_from_micro_sql(micro: ColumnElement[Any], late_fee_paid: ColumnElement[Any],
                           rates: LateFeeRates) -> ColumnElement[Any]:
    """max(0, late_fee.fee_from_micro(micro) - late_fee_paid) as an expression."""
    rounded = _IntDiv(micro + MICRO_PER_FEN // 2, MICRO_PER_FEN)
    fee = sa.case((micro <= 0, 0), else_=_Greatest(rounded, sa.literal(rates.minimum_fen, sa.BigInteger())))
    return _at_least_zero(fee - late_fee_paid)
