"""BANK_ONLY posted and UTILITY_ONLY reversed set-based (recon_bulk) against
one by one (the reference):
two identical utilities reconcile the same random bank days, one each way,
and end with the same payments, allocations, bills, prepaid credit and
ledger, journal and reconciliation lines. Days mix several BANK_ONLY lines
on one account, lines on unknown and closed accounts (demoted), payments
the bank matches, and payments it never sent (reversed) on the same
accounts as BANK_ONLY lines."""
from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mis_adapter import payments
from mis_adapter.payments import PayCommand
from mis_adapter.recon import Reconciliation
from mis_adapter.recon_outcomes import OutcomeApplier
from tests.conftest import SERVERS
from tests.mis_adapter.test_recon import DAY_START, TZ8, World, build_world
from tests.support.databases import fresh_database
from yindian_common.fields import make_account_no

pytestmark = pytest.mark.timeout(300)
BANK = "ICBC"
UNKNOWN = make_account_no("09", 99_999)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def twins(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[World, World]]:
    with fresh_database(request.param, tmp_path, "bulk") as url_a, \
            fresh_database(request.param, tmp_path, "each") as url_b:
        a = build_world(url_a, tmp_path / "a", accounts=30)
        b = build_world(url_b, tmp_path / "b", accounts=30)
        for w in (a, b):
            with w.engine.begin() as conn:
                conn.execute(sa.text("UPDATE customers SET status = 'CLOSED' WHERE account_no = :a"),
                             {"a": w.accounts[-1]})
        yield a, b
        a.ctx.router.dispose()
        b.ctx.router.dispose()


# one bank record: (kind, account index, amount); kinds: the bank's only, matched, the MIS's only
records = st.lists(st.tuples(st.sampled_from(["BANK_ONLY", "BANK_ONLY", "BANK_ONLY", "MATCHED", "UTILITY_ONLY",
                                              "UNKNOWN", "CLOSED"]),
                             st.integers(0, 9),
                             st.one_of(st.integers(1, 300), st.integers(1_000, 40_000), st.integers(100_000, 900_000))),
                   min_size=1, max_size=14)

_day_counter = {"n": 0}


def _reconcile(w: World, day: dt.date, recs: list[tuple[str, int, int]], *, set_based: bool,
               monkeypatch: pytest.MonkeyPatch) -> None:
    w.clock.set(dt.datetime.combine(day, dt.time(10), TZ8))
    lines = []
    for i, (kind, k, amount) in enumerate(recs):
        serial = f"{day:%m%d}-{i}"
        acct = {"UNKNOWN": UNKNOWN, "CLOSED": w.accounts[-1]}.get(kind, w.accounts[k])
        if kind in ("MATCHED", "UTILITY_ONLY"):
            payments.pay(w.ctx, PayCommand(BANK, serial, acct, amount, channel="COUNTER"))
        if kind != "UTILITY_ONLY":
            lines.append((i + 1, serial, acct, amount, "POSTED"))
    w.clock.set(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(9), TZ8))
    monkeypatch.setattr(OutcomeApplier, "set_based", set_based)
    with Reconciliation(w.engine, BANK, day, rates=w.ctx.rates, now=w.clock.now()) as r:
        r.load(lines)
        r.close_day()


def _state(engine: sa.Engine) -> dict[str, Any]:
    """Everything reconciliation wrote, keyed by what it means (serials, bills), not by row ids."""
    with engine.connect() as conn:
        q = lambda sql: [tuple(r) for r in conn.execute(sa.text(sql))]  # noqa: E731
        return {
            "payments": sorted(q("SELECT bank_id, bank_serial, state, account_no, branch_code, amount_fen, channel, "
                                 "settlement_date, arrears_after_fen, prepaid_after_fen, prepaid_added_fen, "
                                 "reversed_on, cancel_serial FROM payments")),
            "allocations": sorted(q("SELECT p.bank_serial, a.bill_id, a.late_fee_fen, a.principal_fen "
                                    "FROM allocations a JOIN payments p ON p.payment_id = a.payment_id")),
            "bills": sorted(q("SELECT bill_id, principal_paid_fen, late_fee_paid_fen, accrual_micro, accrual_date, "
                              "status, paid_on FROM bills")),
            "customers": sorted(q("SELECT account_no, prepaid_fen, status FROM customers")),
            "prepaid": q("SELECT e.account_no, e.reason, e.delta_fen, e.balance_after_fen, p.bank_serial "
                         "FROM prepaid_ledger e LEFT JOIN payments p ON p.payment_id = e.payment_id "
                         "ORDER BY e.account_no, e.entry_id"),
            "journal": Counter(q("SELECT j.bank_id, j.rpc, j.serial, j.account_no, j.amount_fen, j.outcome, "
                                 "p.bank_serial FROM journal j LEFT JOIN payments p ON p.payment_id = j.payment_id")),
            "lines": sorted(q("SELECT bank_serial, outcome, detail, settlement_date FROM recon_lines")),
            # an account's payments in the order they were posted (its history as a statement lists it)
            "posting_order": q("SELECT account_no, bank_serial FROM payments ORDER BY account_no, payment_id"),
        }


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recs=records)
@example(recs=[("UTILITY_ONLY", 1, 50_000), ("UTILITY_ONLY", 2, 300), ("BANK_ONLY", 3, 700), ("MATCHED", 1, 100)])
def test_set_based_outcomes_equal_one_by_one(twins: tuple[World, World], recs: list[tuple[str, int, int]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bulk, each = twins
    _day_counter["n"] += 1
    day = DAY_START.date() + dt.timedelta(days=2 * _day_counter["n"])
    _reconcile(bulk, day, recs, set_based=True, monkeypatch=monkeypatch)
    _reconcile(each, day, recs, set_based=False, monkeypatch=monkeypatch)
    got, want = _state(bulk.engine), _state(each.engine)
    for table in want:
        assert got[table] == want[table], table


def test_a_day_of_bank_only_lines_posts_each_and_demotes_the_unpostable(twins: tuple[World, World],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: the set-based path posts several payments on one account in
    line order (the second sees the first's effect) and demotes unknown and closed accounts."""
    bulk, _each = twins
    day = DAY_START.date() + dt.timedelta(days=60)
    recs = [("BANK_ONLY", 0, 500), ("BANK_ONLY", 0, 50_000_000), ("UNKNOWN", 0, 100), ("CLOSED", 0, 100)]
    _reconcile(bulk, day, recs, set_based=True, monkeypatch=monkeypatch)
    st_ = _state(bulk.engine)
    posted = [p for p in st_["payments"] if p[1].startswith(f"{day:%m%d}-")]
    assert [p[1] for p in posted] == [f"{day:%m%d}-0", f"{day:%m%d}-1"]
    assert posted[0][8] > posted[1][8] == 0          # arrears after: the second payment settles the rest
    assert posted[1][10] > 0                          # and leaves prepaid credit
    demoted = {ln[0]: ln[1] for ln in st_["lines"] if ln[0].startswith(f"{day:%m%d}-")}
    assert demoted[f"{day:%m%d}-2"] == demoted[f"{day:%m%d}-3"] == "MISMATCH"


@pytest.mark.parametrize("twins", SERVERS, indirect=True)  # SQLite has one writer: nothing commits meanwhile
def test_a_serial_taken_while_the_day_closes_is_demoted_and_the_rest_posted(
        twins: tuple[World, World], monkeypatch: pytest.MonkeyPatch) -> None:
    """A payment with a BANK_ONLY line's serial committed between the matching and the
    applying (by a writer that does not take the bank-day lock): the set-based close does not
    fail nor post it twice; that line is demoted (serial taken meanwhile) and every other line
    of the day, on the same account too, is posted as the one-by-one path would."""
    bulk, _each = twins
    day = DAY_START.date() + dt.timedelta(days=70)
    taken = f"{day:%m%d}-1"

    def take_serial(name: str) -> None:
        if name != "mis.recon_mid_apply":
            return
        with bulk.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO payments (bank_id, bank_serial, state, account_no, branch_code, amount_fen, channel, "
                "outlet_code, teller_id, settlement_date, posted_at, arrears_after_fen, prepaid_after_fen, "
                "prepaid_added_fen) VALUES (:b, :s, 'POSTED', :a, '01', 1, 'COUNTER', '', '', :d, :at, 0, 0, 0)"
            ).bindparams(sa.bindparam("d", type_=sa.Date), sa.bindparam("at", type_=sa.DateTime(timezone=True))),
                {"b": BANK, "s": taken, "a": bulk.accounts[0], "d": day, "at": bulk.clock.now()})

    monkeypatch.setattr("mis_adapter.recon.crash_point", take_serial)
    recs = [("BANK_ONLY", 0, 500), ("BANK_ONLY", 0, 700), ("BANK_ONLY", 0, 900), ("BANK_ONLY", 1, 300)]
    _reconcile(bulk, day, recs, set_based=True, monkeypatch=monkeypatch)
    st_ = _state(bulk.engine)
    ours = {p[1]: p for p in st_["payments"] if p[1].startswith(f"{day:%m%d}-")}
    assert {s: (p[5], p[6]) for s, p in ours.items()} == {
        f"{day:%m%d}-0": (500, "RECONCILE"), taken: (1, "COUNTER"), f"{day:%m%d}-2": (900, "RECONCILE"),
        f"{day:%m%d}-3": (300, "RECONCILE")}
    lines = {ln[0]: ln[1:3] for ln in st_["lines"] if ln[0].startswith(f"{day:%m%d}-")}
    assert lines[taken] == ("MISMATCH", "not applied: serial taken meanwhile")
    assert {lines[s][0] for s in lines if s != taken} == {"BANK_ONLY"}
