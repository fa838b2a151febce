"""The journal's indexes after revision 0005_journal_lean_indexes: a pay's outcome adds no entry
to a secondary index on PostgreSQL (the due-rows index holds only open states, the original-serial
index only cancels), and every reader that finds rows by state or original serial is still served
by an index — in the generic plan a prepared statement gets, which proves a partial index's
predicate only from literals. The downgrade restores the full indexes."""
from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from bridge import journal as jn
from bridge.journal import Entry
from bridge.journal.repository import READERS
from bridge.journal.schema import OPEN_STATES_SQL, in_states
from bridge.metrics_collector import IN_DOUBT_BY_BANK
from bridge.migrate import downgrade, upgrade
from bridge.resolver import ANY_DUE
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(120)

READER_INDEX = {"pending": "ix_bridge_journal_state_due", "due_reversals": "ix_bridge_journal_state_due",
                "due_probes": "ix_bridge_journal_state_due", "in_doubt_count": "ix_bridge_journal_state_due",
                "expedite_retryable": "ix_bridge_journal_state_due", "cancels_of": "ix_bridge_journal_original",
                "any_due": "ix_bridge_journal_state_due", "metrics_in_doubt": "ix_bridge_journal_state_due"}
SAMPLE = {"now_ms": "1000", "lim": "10", "day": "2026-11-28", "o": "S1"}


def _statements() -> dict[str, Any]:
    return {**READERS, "any_due": ANY_DUE, "metrics_in_doubt": IN_DOUBT_BY_BANK}


def _indexes(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {r[0]: r[1] for r in conn.execute(sa.text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'bridge_journal'"))}


def _generic_plan(conn: sa.Connection, name: str, stmt: Any) -> str:
    """The statement's plan as a prepared statement's generic plan (no parameter value known)."""
    compiled = stmt.compile(dialect=postgresql.dialect(paramstyle="numeric_dollar"),
                            compile_kwargs={"render_postcompile": True})
    args = [f"'{SAMPLE[p]}'" if p in SAMPLE else repr(compiled.params[p]).replace('"', "'")
            for p in compiled.positiontup or []]
    conn.exec_driver_sql(f"PREPARE {name} AS {compiled.string}")
    call = f"EXECUTE {name}({', '.join(args)})" if args else f"EXECUTE {name}"
    return "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN (COSTS OFF) {call}"))


def _a_day_of_pays(engine: sa.Engine) -> None:
    """A journal as the bridge leaves it: thousands of settled pays, a few cancels and a few rows in doubt."""
    at = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)
    base = {"bank_id": "ICBC", "amount_fen": 100, "business_date": at.date(), "created_at": at, "updated_at": at}
    rows = [Entry(kind=jn.PAY, serial=f"P{i}", state=jn.POSTED, **base) for i in range(3_000)]  # type: ignore[arg-type]
    rows += [Entry(kind=jn.CANCEL, serial=f"C{i}", state=jn.CANCELLED, original_serial=f"P{i}", **base)  # type: ignore[arg-type]
             for i in range(30)]
    rows += [Entry(kind=jn.PAY, serial=f"D{i}", state=s, **base)  # type: ignore[arg-type]
             for i, s in enumerate((jn.PENDING, jn.SUSPECT, jn.REVERSING, jn.RETRYABLE))]
    with engine.begin() as conn:
        conn.execute(jn.requests.insert(), [r.row() for r in rows])
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE bridge_journal")
        conn.commit()


def test_on_postgresql_no_secondary_index_holds_a_settled_pay(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        ix = _indexes(engine)
        assert "ix_bridge_journal_day_state" not in ix
        assert re.search(r"WHERE \(\(state\)::text = ANY \(.*'PENDING'.*'RETRYABLE'.*'REVERSING'.*'SUSPECT'",
                         ix["ix_bridge_journal_state_due"]), ix
        assert "WHERE ((kind)::text = 'CANCEL'::text)" in ix["ix_bridge_journal_original"], ix
        assert jn.POSTED not in OPEN_STATES_SQL and jn.NOT_APPLIED not in OPEN_STATES_SQL
    finally:
        engine.dispose()


def test_every_reader_by_state_or_original_uses_its_index_in_a_generic_plan(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        _a_day_of_pays(engine)
        with engine.connect() as conn:
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            conn.exec_driver_sql("SET enable_seqscan = off")  # an index the plan can use, it will
            for name, stmt in _statements().items():
                plan = _generic_plan(conn, name, stmt)
                assert READER_INDEX[name] in plan and "Seq Scan" not in plan, (name, plan)
            conn.rollback()
    finally:
        engine.dispose()


def test_the_readers_name_only_indexed_states() -> None:
    with pytest.raises(ValueError, match="POSTED"):
        in_states(jn.POSTED)


def test_downgrade_restores_the_full_indexes(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        downgrade(engine, "0004_audit_chain")  # 0005 and every revision after it (0006_seals_batches)
        names = {ix["name"] for ix in sa.inspect(engine).get_indexes("bridge_journal")}
        assert {"ix_bridge_journal_day_state", "ix_bridge_journal_state_due", "ix_bridge_journal_original"} <= names
        if engine.dialect.name == "postgresql":
            assert not any(" WHERE " in d for d in _indexes(engine).values())
        upgrade(engine)
        assert "ix_bridge_journal_day_state" not in {ix["name"] for ix in sa.inspect(engine).get_indexes(
            "bridge_journal")}
    finally:
        engine.dispose()
