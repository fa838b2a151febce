"""Revision 0008_journalpg_audit_lean: bridge_audit keeps no index but its key (nothing in the product
reads the audit by serial), on every back end; the downgrade gives the serial index back. The audit
lines themselves are unchanged: one per outcome, in order (tests/bridge/test_journal.py)."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from bridge.migrate import downgrade, upgrade
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(120)


def _audit_indexes(engine: sa.Engine) -> set[str]:
    return {ix["name"] for ix in sa.inspect(engine).get_indexes("bridge_audit")}  # type: ignore[misc]


def test_the_audit_has_no_index_but_its_key_and_the_downgrade_gives_the_serial_index_back(db_url: str) -> None:
    engine = make_engine(db_url, pool_size=2)
    try:
        upgrade(engine)
        assert _audit_indexes(engine) == set()
        downgrade(engine, "0007_pgcpu_journal_room")
        assert _audit_indexes(engine) == {"ix_bridge_audit_serial"}
        upgrade(engine)
        assert _audit_indexes(engine) == set()
    finally:
        engine.dispose()
