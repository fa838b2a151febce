"""late_fee_sql: the late-fee rule compiled to SQL gives late_fee.py's figure,
to the fen, on SQLite, PostgreSQL and MariaDB (year ends, rounding, the
minimum, dates before the accrual date, fees already paid)."""
from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter.late_fee import FeeState, LateFeeRates, late_fee_due
from mis_adapter.late_fee_sql import late_fee_due_sql

pytestmark = pytest.mark.timeout(120)
RATES = LateFeeRates()
_b = sa.bindparam
EXPR = late_fee_due_sql(principal_unpaid=_b("p", type_=sa.BigInteger), accrual_micro=_b("m", type_=sa.BigInteger),
                        accrual_date=_b("ad", type_=sa.Date), late_fee_paid=_b("fp", type_=sa.BigInteger),
                        tariff_class=_b("tc", type_=sa.String), period=_b("per", type_=sa.String),
                        as_of=_b("as_of", type_=sa.Date), rates=RATES)
STMT = sa.select(EXPR.label("fee"))

states = st.builds(
    FeeState,
    principal_unpaid_fen=st.one_of(st.integers(-500, 0), st.integers(1, 200), st.integers(1, 50_000_000)),
    accrual_micro=st.one_of(st.just(0), st.integers(0, 10**11)),
    accrual_date=st.dates(dt.date(2023, 1, 1), dt.date(2027, 12, 31)),
    late_fee_paid_fen=st.one_of(st.just(0), st.integers(0, 100_000)),
    tariff_class=st.sampled_from(["RESIDENTIAL", "COMMERCIAL", "INDUSTRIAL"]),
    bill_year=st.integers(2022, 2027))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=states, as_of=st.dates(dt.date(2022, 12, 1), dt.date(2028, 3, 1)))
def test_sql_late_fee_equals_the_rule(db_url: str, state: FeeState, as_of: dt.date) -> None:
    engine = _engine(db_url)
    params = {"p": state.principal_unpaid_fen, "m": state.accrual_micro, "ad": state.accrual_date,
              "fp": state.late_fee_paid_fen, "tc": state.tariff_class, "per": f"{state.bill_year}07",
              "as_of": as_of}
    with engine.connect() as conn:
        got = conn.execute(STMT, params).scalar_one()
    assert int(got) == late_fee_due(state, as_of, RATES)


_ENGINES: dict[str, sa.Engine] = {}


def _engine(url: str) -> sa.Engine:
    from yindian_common.db import make_engine
    if url not in _ENGINES:
        _ENGINES[url] = make_engine(url)
    return _ENGINES[url]


def test_sql_late_fee_across_a_year_end() -> None:
    """A commercial bill of 2025 unpaid into 2026: 0.2 %/day to 31 December, 0.3 % after."""
    engine = sa.create_engine("sqlite://")
    state = FeeState(100_000, 0, dt.date(2025, 12, 21), 0, "COMMERCIAL", 2025)
    with engine.connect() as conn:
        got = conn.execute(STMT, {"p": 100_000, "m": 0, "ad": dt.date(2025, 12, 21), "fp": 0, "tc": "COMMERCIAL",
                                  "per": "202511", "as_of": dt.date(2026, 1, 10)}).scalar_one()
    assert got == late_fee_due(state, dt.date(2026, 1, 10), RATES) == 10 * 200 + 10 * 300
