"""The pay's serial look-up uses the unique key whatever the statistics (migration
0004_payments_day_bank).

Pay's READ is prepared with a generic plan, once per connection. On a payments
table never analyzed (a fresh database, until its first autoanalyze) PostgreSQL
planned the look-up on (bank_id, settlement_date) with bank_serial as a filter —
every payment of the bank visited on every pay. With (settlement_date, bank_id)
instead, no index but the unique key is led by bank_id. The downgrade shows the
old plan back."""
from __future__ import annotations

import sqlalchemy as sa

from mis_adapter.migrate import downgrade, upgrade
from mis_adapter.pay_pg import READ_FOR_PAY
from yindian_common.db import make_engine

READ_TYPES = "text, text, text, date, text, text, bigint"


def _payment_indexes(engine: sa.Engine) -> dict[str, list[str]]:
    return {ix["name"] or "": [c or "" for c in ix["column_names"]] for ix in sa.inspect(engine).get_indexes("payments")}


def _serial_lookup_plan(engine: sa.Engine) -> str:
    """Pay's READ, planned generic on this connection as the pays' pool plans it."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        conn.exec_driver_sql(f"PREPARE pay_read ({READ_TYPES}) AS {READ_FOR_PAY}")
        plan = "\n".join(r[0] for r in conn.exec_driver_sql(
            "EXPLAIN (COSTS OFF) EXECUTE pay_read('0100000001', 'ICBC', 'S1', '2026-11-30', '1000', '2000', 1)"))
        conn.rollback()
    return plan


def test_one_index_serves_the_day_and_the_bank(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    indexes = _payment_indexes(engine)
    assert indexes["ix_payments_day_bank"] == ["settlement_date", "bank_id"]
    assert not {"ix_payments_bank_day", "ix_payments_day"} & set(indexes)
    engine.dispose()


def test_the_serial_lookup_of_a_never_analyzed_table_uses_the_unique_key(pg_url: str) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    plan = _serial_lookup_plan(engine)
    assert "uq_payments_bank_id_bank_serial" in plan, plan
    assert "Filter: ((bank_serial)" not in plan, plan
    engine.dispose()


def test_downgrade_brings_back_both_indexes_and_the_old_plan(pg_url: str) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    downgrade(engine, "0004_payments_day_bank@-1")
    assert {"ix_payments_bank_day", "ix_payments_day"} <= set(_payment_indexes(engine))
    assert "ix_payments_bank_day" in _serial_lookup_plan(engine)  # what the pays walked before
    upgrade(engine)
    assert "ix_payments_day_bank" in _payment_indexes(engine)
    engine.dispose()
