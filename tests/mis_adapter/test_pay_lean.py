"""Migration 0004_pgpay_lean_pay: the prepaid ledger without its account_no index (every back end),
on PostgreSQL customers with room on each page (fillfactor 90) and yd_pay with leaner statements (its rules are held equal to the Python path by
test_pay_function.py, which runs on the current revision).

Here: the round trip of the migration on the three databases (the downgrade gives back the index
and, on PostgreSQL, 0004_pay_function's yd_pay); and on PostgreSQL that every statement yd_pay runs
reaches the account, its bills and the serial by an index, never by a scan, once the tables are
analyzed at a size where a scan would cost more; and that a pay's prepaid credit on a freshly loaded
customers table is a HOT update (no index entry)."""
from __future__ import annotations

import datetime as dt
import re

import psycopg
import pytest
import sqlalchemy as sa

from mis_adapter.banks import bank_day_key
from mis_adapter.db.core import PrepaidEntry
from mis_adapter.migrate import downgrade, upgrade
from tests.support.mis_data import BillSpec, add_account, add_bank
from yindian_common.db import make_engine

MONEY_TABLES = ("customers", "bills", "payments", "allocations", "prepaid_ledger", "journal")


def _ledger_indexes(engine: sa.Engine) -> dict[str, list[str]]:
    return {ix["name"] or "": [c or "" for c in ix["column_names"]]
            for ix in sa.inspect(engine).get_indexes("prepaid_ledger")}


def _customers_options(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'customers'")).scalar_one()
                    or [])


def _pay_source(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT prosrc FROM pg_proc WHERE proname = 'yd_pay'")).scalar_one())


def test_the_ledger_loses_its_account_index_and_the_downgrade_gives_it_back(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        assert "ix_prepaid_ledger_account_no" not in _ledger_indexes(engine)
        assert PrepaidEntry.__table__.c.account_no.index is not True  # the model says the same
        pg = engine.dialect.name == "postgresql"
        lean = _pay_source(engine) if pg else ""
        assert not pg or _customers_options(engine) == ["fillfactor=50"]  # 0004_pgcpu_customers_room, applied after
        downgrade(engine, "0004_pgpay_lean_pay@-1")
        assert _ledger_indexes(engine)["ix_prepaid_ledger_account_no"] == ["account_no"]
        if pg:
            assert _customers_options(engine) == []
            old = _pay_source(engine)
            assert "day_lock AS MATERIALIZED" in old and "nextval" not in old  # 0004_pay_function's body
            assert "nextval" in lean
        upgrade(engine)
        assert "ix_prepaid_ledger_account_no" not in _ledger_indexes(engine)
        if pg:
            assert _pay_source(engine) == lean and _customers_options(engine) == ["fillfactor=50"]
    finally:
        engine.dispose()


def _plans_of_pays(url: str, calls: list[tuple[str, str, int]]) -> list[str]:
    """The plans of every statement yd_pay runs (auto_explain, nested statements), generic as the
    pays' connections plan them, for each (account, serial, amount); each call commits."""
    notices: list[str] = []
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        for s in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                  "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_level = 'notice'",
                  "SET plan_cache_mode = force_generic_plan", "SET client_min_messages = notice"):
            conn.execute(s)
        for acct, serial, amount in calls:
            row = conn.execute(
                "SELECT code FROM yd_pay(%s, 'ICBC', %s, %s, %s, %s, 'COUNTER', 'O', 'T', NULL, now(), "
                "1000, 2000, 3000, 100)", (acct, serial, dt.date(2026, 11, 30), bank_day_key("ICBC"), amount),
                prepare=True).fetchone()
            assert row is not None and row[0] == "POSTED", row
    return notices


def test_every_statement_of_a_pay_reaches_its_rows_by_an_index(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        add_bank(engine, "ICBC")
        bills = [BillSpec("202609", 5_000, dt.date(2026, 10, 20)), BillSpec("202610", 6_000, dt.date(2026, 11, 20))]
        accts = [add_account(engine, "01", i, bills if i % 2 else (), prepaid_fen=100) for i in range(1, 41)]
        with engine.begin() as conn:  # a size where a scan costs more than a probe, then statistics
            conn.execute(sa.text(
                "INSERT INTO customers (account_no, branch_code, name, address, phone, tariff_class, status, "
                "prepaid_fen, opened_on) SELECT '8' || lpad(g::text, 9, '0'), '01', 'n', 'a', 'p', 'RESIDENTIAL', "
                "'OPEN', 0, DATE '2020-01-01' FROM generate_series(1, 3000) g"))
            conn.execute(sa.text(
                "INSERT INTO bills (account_no, period, kwh, amount_fen, prepaid_applied_fen, principal_paid_fen, "
                "late_fee_paid_fen, accrual_micro, accrual_date, due_date, issued_at, status, dunning) "
                "SELECT '8' || lpad(g::text, 9, '0'), p, 1, 100, 0, 0, 0, 0, DATE '2026-01-20', DATE '2026-01-20', "
                "now(), 'UNPAID', false FROM generate_series(1, 3000) g, unnest(ARRAY['202607', '202608']) p"))
            conn.execute(sa.text(
                "INSERT INTO payments (bank_id, bank_serial, state, account_no, branch_code, amount_fen, channel, "
                "outlet_code, teller_id, settlement_date, posted_at, arrears_after_fen, prepaid_after_fen, "
                "prepaid_added_fen) SELECT 'ICBC', 'OLD' || g, 'POSTED', '8' || lpad(g::text, 9, '0'), '01', 100, "
                "'COUNTER', 'O', 'T', DATE '2026-11-01', now(), 0, 0, 100 FROM generate_series(1, 3000) g"))
            conn.execute(sa.text("ANALYZE"))
        # odd accounts settle bills (payment, allocations, bills, journal; credit when over-paid), even ones
        # only add credit (payment, customer, ledger, journal)
        plans = _plans_of_pays(pg_url, [(a, f"LEAN{i}", 20_000 if i % 3 else 3_000) for i, a in enumerate(accts)])
    finally:
        engine.dispose()
    text = "\n".join(plans)
    scans = re.findall(r"(Seq Scan|Bitmap Heap Scan|Index Scan|Index Only Scan)(?: using \w+)? on (\w+)", text)
    assert {t for kind, t in scans if kind == "Seq Scan"} & set(MONEY_TABLES) == set(), text
    probed = {t for kind, t in scans if kind != "Seq Scan"}
    assert {"customers", "bills", "payments"} <= probed, text  # the lock, the bills, the serial (and FK checks)
    assert re.search(r"Insert on payments", text) and re.search(r"Update on bills", text), text
    assert re.search(r"Insert on prepaid_ledger", text), text


@pytest.mark.parametrize("field", ["Insert on allocations", "Update on customers", "Insert on journal"])
def test_the_plans_show_each_write(pg_url: str, field: str) -> None:
    """The write's parts are there for the accounts that need them (the test above is not vacuous)."""
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        add_bank(engine, "ICBC")
        acct = add_account(engine, "01", 7, [BillSpec("202610", 6_000, dt.date(2026, 11, 20))], prepaid_fen=10)
        plans = _plans_of_pays(pg_url, [(acct, "W1", 9_000)])  # pays the bill, the rest is credit
    finally:
        engine.dispose()
    assert field in "\n".join(plans)


def test_a_pays_credit_on_freshly_loaded_customers_is_a_hot_update(pg_url: str) -> None:
    """Customers loaded in bulk (as the seed and a migration from another system load them), then a pay
    adding prepaid credit to one account on each of five pages: every customer update is HOT."""
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        add_bank(engine, "ICBC")
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO branches (code, name) VALUES ('01', 'b')"))
            conn.execute(sa.text(
                "INSERT INTO customers (account_no, branch_code, name, address, phone, tariff_class, status, "
                "prepaid_fen, opened_on) SELECT '8' || lpad(g::text, 9, '0'), '01', '张三丰', '人民路1号', "
                "'13812345678', 'RESIDENTIAL', 'OPEN', 0, DATE '2020-01-01' FROM generate_series(1, 1000) g"))
            pages = conn.execute(sa.text("SELECT count(DISTINCT (ctid::text::point)[0]) FROM customers")).scalar_one()
        assert pages >= 10
        accts = [f"8{n:09d}" for n in (1, 201, 401, 601, 801)]
        with engine.connect() as conn:
            for i, acct in enumerate(accts):
                code = conn.execute(sa.text(
                    "SELECT code FROM yd_pay(:a, 'ICBC', :s, DATE '2026-11-30', :k, 700, 'COUNTER', 'O', 'T', NULL, "
                    "now(), 1000, 2000, 3000, 100)"), {"a": acct, "s": f"HOT{i}", "k": bank_day_key("ICBC")}).scalar_one()
                assert code == "POSTED"
            updated, hot = conn.execute(sa.text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                                                "WHERE relname = 'customers'")).one()
            prepaid = conn.execute(sa.text("SELECT sum(prepaid_fen) FROM customers")).scalar_one()
            conn.rollback()
    finally:
        engine.dispose()
    assert prepaid == 5 * 700
    assert (updated, hot) == (5, 5)
