"""Migration 0004_pgpay2_lean_read: on PostgreSQL yd_pay reads the bank's state and the unpaid bills in
one SELECT INTO (no cursor) and runs fewer PL/pgSQL expressions; other databases: nothing. Its rules are
held equal to the Python path by test_pay_function.py (which runs on the current revision), and
yd_pay_many (which calls it) by test_pay_batch.py.

Here: the round trip of the migration on the three databases (on PostgreSQL the downgrade gives back
0004_pgpay_lean_pay's yd_pay and drops the bill type), and on PostgreSQL a pay's answers and rows in each
of the function's paths, on this yd_pay and on the one it replaced: no unpaid bill (credit only), bills
settled with and without credit left over, and each refusal, which the new read decides."""
from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from mis_adapter.banks import bank_day_key
from mis_adapter.migrate import downgrade, upgrade
from tests.support.mis_data import BillSpec, add_account, add_bank
from yindian_common.db import make_engine

DAY = dt.date(2026, 11, 30)


def _pay_source(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT prosrc FROM pg_proc WHERE proname = 'yd_pay'")).scalar_one())


def _bill_type(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM pg_type WHERE typname = 'yd_pay_bill'")).scalar_one())


def test_the_migration_round_trip(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        pg = engine.dialect.name == "postgresql"
        lean_read = _pay_source(engine) if pg else ""
        if pg:
            assert "FOREACH r IN ARRAY v_bills" in lean_read and "FOR r IN" not in lean_read
            assert "WHERE c.ctid = v_ctid" in lean_read and "WHERE c.account_no = p_account FOR UPDATE" in lean_read
            assert _bill_type(engine) == 1
        downgrade(engine, "0004_pgpay2_lean_read@-1")
        if pg:
            old = _pay_source(engine)
            assert "FOR r IN" in old and "LEFT JOIN bills b" in old  # 0004_pgpay_lean_pay's body
            assert _bill_type(engine) == 0
        upgrade(engine)
        if pg:
            assert _pay_source(engine) == lean_read and _bill_type(engine) == 1
    finally:
        engine.dispose()


def _pay(engine: sa.Engine, acct: str, serial: str, amount: int, day: dt.date = DAY) -> tuple[object, ...]:
    with engine.begin() as conn:
        row = conn.execute(sa.text(
            "SELECT code, payment_id IS NOT NULL, branch_code, settlement, arrears_after, prepaid_after, refusal, "
            "allocs FROM yd_pay(:a, 'ICBC', :s, :d, :k, :m, 'COUNTER', 'O', 'T', NULL, now(), 1000, 2000, 3000, "
            "100)"), {"a": acct, "s": serial, "d": day, "k": bank_day_key("ICBC"), "m": amount}).one()
    return tuple(row)


def _written(engine: sa.Engine, acct: str) -> tuple[object, ...]:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(
            "SELECT (SELECT count(*) FROM payments WHERE account_no = :a), "
            "(SELECT count(*) FROM journal WHERE account_no = :a), "
            "(SELECT count(*) FROM prepaid_ledger WHERE account_no = :a), "
            "(SELECT prepaid_fen FROM customers WHERE account_no = :a), "
            "(SELECT string_agg(b.period || ':' || b.status || ':' || b.principal_paid_fen || ':' "
            "                   || b.late_fee_paid_fen, ',' ORDER BY b.period) FROM bills b WHERE account_no = :a)"),
            {"a": acct}).one())


@pytest.mark.parametrize("revision", ["lean_read", "lean"])
def test_each_path_answers_and_writes_as_before(pg_url: str, revision: str) -> None:
    """The same pays and bank states, on this revision's yd_pay and on 0004_pgpay_lean_pay's (downgraded):
    the same answers and rows, as spelled out here."""
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        if revision == "lean":
            downgrade(engine, "0004_pgpay2_lean_read@-1")
        assert ("FOREACH r IN ARRAY v_bills" in _pay_source(engine)) == (revision == "lean_read")
        add_bank(engine, "ICBC")
        due = dt.date(2026, 11, 20)  # 10 days late on DAY: a residential late fee of 5 fen, raised to the 100 minimum
        credit_only = add_account(engine, "01", 1, (), prepaid_fen=100)
        two_bills = [BillSpec("202609", 5_000, due), BillSpec("202610", 6_000, due)]
        settles = add_account(engine, "01", 2, two_bills)
        over = add_account(engine, "01", 3, two_bills, prepaid_fen=7)
        closed = add_account(engine, "01", 4, (), status="CLOSED")

        assert _pay(engine, credit_only, "S1", 2_500) == ("POSTED", True, "01", DAY, 0, 2_600, None, "")
        assert _written(engine, credit_only) == (1, 1, 1, 2_600, None)
        got = _pay(engine, settles, "S2", 5_100)  # the first bill's fee and principal, in period order
        assert got[:7] == ("POSTED", True, "01", DAY, 6_000, 0, None) and got[7].endswith(":100:5000")
        assert _written(engine, settles) == (1, 1, 0, 0, "202609:PAID:5000:100,202610:UNPAID:0:0")
        got = _pay(engine, over, "S3", 20_000)
        assert got[:7] == ("POSTED", True, "01", DAY, 0, 7 + 20_000 - 11_200, None)
        assert [a.split(":")[1:] for a in str(got[7]).split(",")] == [["100", "5000"], ["100", "6000"]]
        assert _written(engine, over) == (1, 1, 1, 7 + 8_800, "202609:PAID:5000:100,202610:PAID:6000:100")

        # two pays of one account in one transaction (as yd_pay_many calls them): the second locks and
        # credits the row the first updated
        twice = add_account(engine, "01", 5, (), prepaid_fen=1)
        with engine.begin() as conn:
            for serial, amount in (("T1", 300), ("T2", 40)):
                conn.execute(sa.text(
                    "SELECT code FROM yd_pay(:a, 'ICBC', :s, :d, :k, :m, 'COUNTER', 'O', 'T', NULL, now(), 1000, 2000, "
                    "3000, 100)"), {"a": twice, "s": serial, "d": DAY, "k": bank_day_key("ICBC"),
                                    "m": amount})
        assert _written(engine, twice) == (2, 2, 2, 341, None)

        # refusals write nothing and answer as 0004_pgpay_lean_pay did (allocs '', no amounts)
        assert _pay(engine, credit_only, "S1", 1) == ("TAKEN", True, "01", None, None, None, None, "")
        assert _pay(engine, "0199999999", "S4", 1) == ("NOT_FOUND", False, None, None, None, None, None, None)
        assert _pay(engine, closed, "S5", 1) == ("CLOSED", False, "01", None, None, None, None, "")
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO reconciled_days (bank_id, settlement_date, reconciled_at, summary_json) "
                                 "VALUES ('ICBC', :d, now(), '{}')"), {"d": DAY})
        # today reconciled: tomorrow's settlement; today and tomorrow: the day is closed
        assert _pay(engine, credit_only, "S6", 10)[:6] == ("POSTED", True, "01", DAY + dt.timedelta(days=1), 0, 2_610)
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO reconciled_days (bank_id, settlement_date, reconciled_at, summary_json) "
                                 "VALUES ('ICBC', :d, now(), '{}')"), {"d": DAY + dt.timedelta(days=1)})
        assert _pay(engine, credit_only, "S7", 10) == ("DAY_CLOSED", False, "01", None, None, None, None, "")
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE banks SET suspended = true, suspended_reason = 'strike' "
                                 "WHERE bank_id = 'ICBC'"))
        assert _pay(engine, credit_only, "S8", 10) == ("SUSPENDED", False, "01", None, None, None, "strike", "")
        # the serial taken comes first, before the suspension
        assert _pay(engine, credit_only, "S1", 10)[:2] == ("TAKEN", True)
        assert _written(engine, credit_only) == (2, 2, 2, 2_610, None)

    finally:
        engine.dispose()

