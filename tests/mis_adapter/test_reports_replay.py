"""The arrears reports' bills priced in SQL (reports._arrears_bills: every bill's
principal and late fee as of a past date, the bills touched after it replayed as
window sums, the others priced from their current accrual) against the one-by-one
rule of the reference reconstruction (reports.fee_as_of), on SQLite, PostgreSQL and
MariaDB: random bills with several partial allocations before and after the as-of
date, some reversed before or after it, paid partly outside any allocation
(migrated history), across year ends, every tariff."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import reports
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.migrate import upgrade
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(180)
RATES = LateFeeRates()
TARIFFS = ("RESIDENTIAL", "COMMERCIAL", "INDUSTRIAL")
ACCOUNTS = {t: f"01{i:07d}{i}" for i, t in enumerate(TARIFFS)}  # shape only: no check digit is verified here
BASE = dt.date(2025, 6, 1)
ISSUED_BEFORE = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)  # every bill: the issue-date filter is not tested here


def _priced(conn: sa.Connection, as_of: dt.date) -> dict[int, tuple[int, int]]:
    """bill id -> (principal, late fee) at as_of, as the reports' SQL prices the bills in arrears then."""
    dialect = conn.dialect.name
    bills = reports._arrears_bills(False, RATES, dialect)
    params = _params(as_of, dialect == "sqlite")
    with reports._materialised(conn, params, RATES):
        rows = conn.execute(sa.select(bills.c.bill_id, bills.c.unpaid_fen, bills.c.fee_sql), params).all()
    return {int(r.bill_id): (int(r.unpaid_fen), int(r.fee_sql)) for r in rows}


def _params(as_of: dt.date, sqlite: bool) -> dict[str, Any]:
    return {"as_of": as_of, "issued_before": ISSUED_BEFORE.replace(tzinfo=None) if sqlite else ISSUED_BEFORE}

allocation = st.tuples(
    st.integers(1, 40_000),                       # principal
    st.sampled_from([0, 0, 100, 250]),            # late fee paid with it
    st.integers(-30, 700),                        # settled, days after BASE
    st.sampled_from(["POSTED", "POSTED", "REVERSED"]),
    st.one_of(st.none(), st.integers(0, 60)))     # reversed, days after settled (REVERSED only)
bill = st.fixed_dictionaries({
    "amount": st.integers(1, 200_000), "prepaid": st.sampled_from([0, 0, 500]),
    "migrated": st.sampled_from([0, 0, 300]), "migrated_fee": st.sampled_from([0, 0, 100]),
    "due": st.integers(-20, 200), "tariff": st.sampled_from(TARIFFS), "year": st.sampled_from([2024, 2025]),
    "allocations": st.lists(allocation, min_size=0, max_size=6)})


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = make_engine(db_url, sqlite_synchronous="NORMAL")
    upgrade(eng)
    with eng.begin() as conn:
        conn.execute(sa.text("INSERT INTO branches (code, name) VALUES ('01', 'one')"))
        conn.execute(sa.text("INSERT INTO banks (bank_id, name, suspended, suspended_reason) "
                             "VALUES ('B', 'bank', false, '')"))
        for tariff, account in ACCOUNTS.items():
            conn.execute(sa.text(
                "INSERT INTO customers (account_no, branch_code, name, address, phone, tariff_class, status, "
                "prepaid_fen, opened_on) VALUES (:a, '01', 'n', '-', '13800000000', :t, 'OPEN', 0, :d)")
                .bindparams(sa.bindparam("d", type_=sa.Date)), {"a": account, "t": tariff, "d": BASE})
    yield eng
    eng.dispose()


def _insert(conn: sa.Connection, bills: list[dict[str, Any]], sqlite: bool) -> list[SimpleNamespace]:
    """The bills and their payments as Pay and the reconciliation leave them; returns what fee_as_of reads."""
    out = []
    payment_id = 0
    issued = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for n, b in enumerate(bills, start=1):
        due = BASE + dt.timedelta(days=b["due"])
        allocs = []
        for principal, fee, settled, state, reversed_after in b["allocations"]:
            payment_id += 1
            sd = BASE + dt.timedelta(days=settled)
            reversed_on = sd + dt.timedelta(days=reversed_after) if state == "REVERSED" and reversed_after is not None \
                else None
            allocs.append((payment_id, principal, fee, state, sd, reversed_on))
        posted = [a for a in allocs if a[3] == "POSTED"]
        row = SimpleNamespace(
            bill_id=n, period=f"{b['year']}{n:02d}", amount_fen=b["amount"], prepaid_applied_fen=b["prepaid"],
            principal_paid_fen=b["migrated"] + sum(a[1] for a in posted),
            late_fee_paid_fen=b["migrated_fee"] + sum(a[2] for a in posted), accrual_micro=123_456_789,
            accrual_date=max([due] + [a[4] for a in allocs]), due_date=due, tariff_class=b["tariff"])
        conn.execute(reports.T_BILL.insert().values(
            bill_id=n, account_no=ACCOUNTS[b["tariff"]], period=row.period, kwh=1, amount_fen=row.amount_fen,
            prepaid_applied_fen=row.prepaid_applied_fen, principal_paid_fen=row.principal_paid_fen,
            late_fee_paid_fen=row.late_fee_paid_fen, accrual_micro=row.accrual_micro, accrual_date=row.accrual_date,
            due_date=due, issued_at=issued.replace(tzinfo=None) if sqlite else issued, status="UNPAID", paid_on=None,
            dunning=False))
        for pid, principal, fee, state, sd, reversed_on in allocs:
            conn.execute(reports.T_PAY.insert().values(
                payment_id=pid, bank_id="B", bank_serial=f"S{pid}", state=state,
                account_no=ACCOUNTS[b["tariff"]], branch_code="01", amount_fen=principal + fee, channel="COUNTER",
                outlet_code="", teller_id="", settlement_date=sd, posted_at=issued.replace(tzinfo=None)
                if sqlite else issued, arrears_after_fen=0, prepaid_after_fen=0, prepaid_added_fen=0,
                reversed_on=reversed_on))
            conn.execute(reports.T_ALLOC.insert().values(payment_id=pid, bill_id=n, late_fee_fen=fee,
                                                         principal_fen=principal))
        row.replay = reports._Replay([(p, f, s, sd, ro) for _pid, p, f, s, sd, ro in
                                      sorted(allocs, key=lambda a: (a[4], a[0]))])
        out.append(row)
    return out


def _needs_replay(row: SimpleNamespace, as_of: dt.date) -> bool:
    """The bills the report replays: touched by a payment posted or reversed after as_of, or accrued past it."""
    changed = any((s == "POSTED" and sd > as_of) or (s == "REVERSED" and sd <= as_of and ro is not None and ro > as_of)
                  for _p, _f, s, sd, ro in row.replay.allocations)
    return changed or (row.accrual_date > as_of and row.accrual_date > row.due_date)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bills=st.lists(bill, min_size=1, max_size=5), data=st.data())
def test_set_based_replay_equals_the_one_by_one_replay(engine: sa.Engine, bills: list[dict[str, Any]],
                                                       data: st.DataObject) -> None:
    # as of any day, or a day on which something happened (a due date, a payment, a reversal) or the day before
    events = [d for b in bills for a in b["allocations"] for d in (a[2], a[2] + (a[4] or 0))] + [b["due"] for b in bills]
    day = data.draw(st.one_of(st.integers(-40, 800), st.sampled_from(events).map(lambda d: d - 1),
                              st.sampled_from(events)))
    as_of = BASE + dt.timedelta(days=day)
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            rows = _insert(conn, bills, engine.dialect.name == "sqlite")
            got = _priced(conn, as_of)
        finally:
            trans.rollback()
    assert got == {r.bill_id: owed for r in rows if (owed := _owed(r, as_of))[0] > 0}


def _owed(row: SimpleNamespace, as_of: dt.date) -> tuple[int, int]:
    """The reference's (principal, fee) of the bill at as_of: its principal now with the delta undone; the
    fee replayed when the bill needs it, otherwise from its current accrual."""
    delta = sum(-p if s == "POSTED" and sd > as_of else
                p if s == "REVERSED" and sd <= as_of and ro is not None and ro > as_of else 0
                for p, _f, s, sd, ro in row.replay.allocations)
    unpaid = row.amount_fen - row.prepaid_applied_fen - row.principal_paid_fen - delta
    if _needs_replay(row, as_of):
        return unpaid, reports.fee_as_of(row, as_of, 0, 0, row.replay, RATES)
    return unpaid, reports.fee_as_of(row, as_of, unpaid, row.late_fee_paid_fen, None, RATES)


@pytest.mark.parametrize(("reversed_day", "as_of_day", "fee"), [
    (None, 50, 260),   # 10,000 x 10 days + 4,000 x 40 days at 0.1 %/day
    (50, 49, 256),     # reversed after the as-of date: still in effect then (10,000 x 10 + 4,000 x 39)
    (50, 50, 500),     # reversed on the as-of date: not in effect (10,000 x 50)
])
def test_a_partial_payment_before_the_as_of_date_changes_the_accrual(engine: sa.Engine, reversed_day: int | None,
                                                                      as_of_day: int, fee: int) -> None:
    """Not vacuous: 10,000 fen due on BASE, 6,000 paid 10 days later (reversed or not), the rest 100 days
    later (after the as-of date)."""
    state = "POSTED" if reversed_day is None else "REVERSED"
    b = {"amount": 10_000, "prepaid": 0, "migrated": 0, "migrated_fee": 0, "due": 0, "tariff": "RESIDENTIAL",
         "year": 2025, "allocations": [(6_000, 0, 10, state, None if reversed_day is None else reversed_day - 10),
                                       (4_000, 0, 100, "POSTED", None)]}
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            rows = _insert(conn, [b], engine.dialect.name == "sqlite")
            got = _priced(conn, BASE + dt.timedelta(days=as_of_day))
        finally:
            trans.rollback()
    assert {bill_id: owed[1] for bill_id, owed in got.items()} == {1: fee}
    assert reports.fee_as_of(rows[0], BASE + dt.timedelta(days=as_of_day), 0, 0, rows[0].replay, RATES) == fee
