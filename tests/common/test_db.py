"""Database set-up rules shared by every process."""
from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from mis_adapter.migrate import upgrade
from tests.support.databases import admin_url
from yindian_common.db import make_engine, normalize_url


def test_a_case_insensitive_mariadb_database_is_refused() -> None:
    """'ab-1' and 'AB-1' are two serials: a database that would merge them is refused."""
    admin = admin_url("mariadb")
    name = f"yd_ci_{uuid.uuid4().hex[:8]}"
    eng = sa.create_engine(normalize_url(admin), isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    try:
        target = make_engine(sa.make_url(normalize_url(admin)).set(database=name).render_as_string(False))
        with pytest.raises(SystemExit, match="utf8mb4_bin"):
            upgrade(target)
        target.dispose()
    finally:
        with eng.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE `{name}`")
        eng.dispose()


def test_serials_differing_only_in_case_are_two_payments(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:
        for serial in ("ab-1", "AB-1"):
            conn.exec_driver_sql(
                "INSERT INTO payments (bank_id, bank_serial, state, branch_code, amount_fen, channel, outlet_code, "
                "teller_id, settlement_date, posted_at, arrears_after_fen, prepaid_after_fen, prepaid_added_fen) "
                f"VALUES ('ICBC', '{serial}', 'TOMBSTONE', '', 1, '', '', '', '2026-11-28', '2026-11-28 00:00:00', "
                "0, 0, 0)")
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM payments WHERE bank_serial = 'ab-1'").scalar_one() == 1
    engine.dispose()
