"""Migration 0004_pgcpu_customers_room: on PostgreSQL the customers' pages keep half their room
(fillfactor 50), so that pays adding prepaid credit to accounts that share a page keep their row on
that page (a HOT update: no index entry, no WAL-logged lock of the old version, no second page)
even while an open snapshot keeps the dead versions from being pruned, as the pays' concurrent readers
do under load. At fillfactor 90 (0004_pgpay_lean_pay) the sixth version on a page already moved.
The downgrade gives back 90."""
from __future__ import annotations

import psycopg
import sqlalchemy as sa

from mis_adapter.banks import bank_day_key
from mis_adapter.migrate import downgrade, upgrade
from tests.support.mis_data import add_bank
from yindian_common.db import make_engine

PAYS = 16  # two on each of eight accounts that share the first page


def _options(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'customers'")).scalar_one()
                    or [])


def test_credit_pays_on_one_page_stay_on_it_while_a_snapshot_holds_the_old_versions(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        assert _options(engine) == ["fillfactor=50"]
        add_bank(engine, "ICBC")
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO branches (code, name) VALUES ('01', 'b')"))
            conn.execute(sa.text(
                "INSERT INTO customers (account_no, branch_code, name, address, phone, tariff_class, status, "
                "prepaid_fen, opened_on) SELECT '8' || lpad(g::text, 9, '0'), '01', '张三丰', '人民路1号', "
                "'13812345678', 'RESIDENTIAL', 'OPEN', 0, DATE '2020-01-01' FROM generate_series(1, 400) g"))
        with engine.connect() as conn:
            before = {r[0]: r[1] for r in conn.execute(sa.text(
                "SELECT account_no, (ctid::text::point)[0]::int FROM customers"))}
        accts = sorted(a for a, page in before.items() if page == 0)[:PAYS // 2]
        assert len(accts) == PAYS // 2
        dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as reader, psycopg.connect(dsn, autocommit=True) as payer:
            reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            assert reader.execute("SELECT count(*) FROM customers").fetchone() == (400,)  # its snapshot, held
            for i in range(PAYS):
                row = payer.execute(
                    "SELECT code FROM yd_pay(%s, 'ICBC', %s, DATE '2026-11-30', %s, 700, 'COUNTER', 'O', 'T', NULL, "
                    "now(), 1000, 2000, 3000, 100)", (accts[i % len(accts)], f"ROOM{i}", bank_day_key("ICBC"))
                ).fetchone()
                assert row == ("POSTED",)
            after = {r[0]: (r[1], r[2]) for r in payer.execute(
                "SELECT account_no, (ctid::text::point)[0]::int, prepaid_fen FROM customers WHERE account_no = ANY(%s)",
                (accts,))}
            reader.rollback()
    finally:
        engine.dispose()
    assert {a: v[1] for a, v in after.items()} == {a: 2 * 700 for a in accts}
    assert {a: v[0] for a, v in after.items()} == {a: 0 for a in accts}  # every version on the first page


def test_downgrade_gives_back_fillfactor_90(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        downgrade(engine, "0004_pgcpu_customers_room@-1")
        assert _options(engine) == ["fillfactor=90"]
        upgrade(engine)
        assert _options(engine) == ["fillfactor=50"]
    finally:
        engine.dispose()
