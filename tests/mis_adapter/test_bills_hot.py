"""A payment's bill update writes no index entry it need not (migration 0004_bills_hot).

Every bill a payment settles changes its status, paid_on, accrual date and paid
amounts. No index may cover those columns: on MariaDB and SQLite each one is an
index entry more per settled bill, and on PostgreSQL a single one makes every
such update a non-HOT update (new entries in every index of the table). The
downgrade puts the status index back."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from mis_adapter.migrate import downgrade, upgrade
from yindian_common.db import make_engine

# what allocation/payment posting and reversal change on a bill
CHANGED_BY_A_PAYMENT = {"status", "paid_on", "accrual_date", "accrual_micro", "principal_paid_fen",
                        "late_fee_paid_fen"}


def _indexed_columns(engine: sa.Engine) -> dict[str, set[str]]:
    insp = sa.inspect(engine)
    out = {ix["name"] or "": {c for c in ix["column_names"] if c} for ix in insp.get_indexes("bills")}
    out.update({uq["name"] or "": set(uq["column_names"]) for uq in insp.get_unique_constraints("bills")})
    return out


def _seed_bill(conn: sa.Connection) -> None:
    conn.execute(sa.text("INSERT INTO branches (code, name) VALUES ('01', 'b')"))
    conn.execute(sa.text(
        "INSERT INTO customers (account_no, branch_code, name, address, phone, tariff_class, status, prepaid_fen, "
        "opened_on) VALUES ('0100000001', '01', 'n', '-', '1', 'RESIDENTIAL', 'OPEN', 0, :d)"),
        {"d": dt.date(2020, 1, 1)})
    conn.execute(sa.text(
        "INSERT INTO bills (account_no, period, kwh, amount_fen, prepaid_applied_fen, principal_paid_fen, "
        "late_fee_paid_fen, accrual_micro, accrual_date, due_date, issued_at, status, paid_on, dunning) "
        "VALUES ('0100000001', '202610', 100, 5000, 0, 0, 0, 0, :due, :due, :at, 'UNPAID', NULL, :f)"),
        {"due": dt.date(2026, 11, 25), "at": dt.datetime(2026, 11, 1, 2, 0), "f": False})


def test_no_bill_index_covers_a_column_a_payment_changes(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    covering = {name: cols & CHANGED_BY_A_PAYMENT for name, cols in _indexed_columns(engine).items()}
    assert {name: cols for name, cols in covering.items() if cols} == {}
    engine.dispose()


def test_settling_a_bill_is_a_hot_update_on_postgresql(pg_url: str) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    with engine.begin() as conn:
        _seed_bill(conn)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE bills SET principal_paid_fen = amount_fen, late_fee_paid_fen = 12, "
                             "accrual_micro = 12000000, accrual_date = :d, status = 'PAID', paid_on = :d"),
                     {"d": dt.date(2026, 11, 28)})
        updated, hot = conn.execute(sa.text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                                            "WHERE relname = 'bills'")).one()
        assert (updated, hot) == (1, 1)
        options = conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'bills'")).scalar_one()
        assert "fillfactor=50" in (options or [])
    engine.dispose()


def test_settling_a_batch_of_bills_in_one_statement_is_hot_throughout_on_postgresql(pg_url: str) -> None:
    """The feed settles a batch's bills in one UPDATE (feed._SETTLE_BILLS): every bill of a full page
    gets its new version on that page (0004_bills_feed_hot). At fillfactor 90 about one in ten did."""
    engine = make_engine(pg_url)
    upgrade(engine)
    n = 600
    with engine.begin() as conn:
        _seed_bill(conn)
        conn.execute(sa.text(
            "INSERT INTO customers (account_no, branch_code, name, address, phone, tariff_class, status, prepaid_fen, "
            "opened_on) SELECT lpad(g::text, 10, '0'), '01', 'n', '-', '1', 'RESIDENTIAL', 'OPEN', 0, :d "
            "FROM generate_series(2, :n) AS g"), {"d": dt.date(2020, 1, 1), "n": n})
        conn.execute(sa.text(
            "INSERT INTO bills (account_no, period, kwh, amount_fen, prepaid_applied_fen, principal_paid_fen, "
            "late_fee_paid_fen, accrual_micro, accrual_date, due_date, issued_at, status, paid_on, dunning) "
            "SELECT lpad(g::text, 10, '0'), '202610', 100, 5000, 0, 0, 0, 0, :due, :due, :at, 'UNPAID', NULL, false "
            "FROM generate_series(2, :n) AS g"),
            {"due": dt.date(2026, 11, 25), "at": dt.datetime(2026, 11, 1, 2, 0), "n": n})
    with engine.begin() as conn:
        ids = list(conn.execute(sa.text("SELECT bill_id FROM bills")).scalars())
        conn.execute(sa.text("UPDATE bills SET principal_paid_fen = amount_fen - prepaid_applied_fen, status = 'PAID', "
                             "paid_on = :d, dunning = false WHERE bill_id = ANY(:ids)"),
                     {"d": dt.date(2026, 11, 28), "ids": ids})
        updated, hot = conn.execute(sa.text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                                            "WHERE relname = 'bills'")).one()
    assert (updated, hot) == (n, n)
    engine.dispose()


def test_downgrade_gives_back_fillfactor_90(pg_url: str) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    downgrade(engine, "0004_bills_feed_hot@-1")
    with engine.connect() as conn:
        assert "fillfactor=90" in (conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'bills'"))
                                   .scalar_one() or [])
    upgrade(engine)
    engine.dispose()


def test_downgrade_restores_the_status_index(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    downgrade(engine, "0004_bills_hot@-1")
    assert _indexed_columns(engine).get("ix_bills_status_due") == {"status", "due_date"}
    upgrade(engine)
    assert "ix_bills_status_due" not in _indexed_columns(engine)
    engine.dispose()
