"""The MIS journal keeps only its primary key (migration 0004_journal_no_bank_at):
a pay writes one index entry less there. The downgrade brings the (bank_id, at)
index back, on every back end."""
from __future__ import annotations

import sqlalchemy as sa

from mis_adapter.migrate import downgrade, upgrade
from yindian_common.db import make_engine


def _journal_indexes(engine: sa.Engine) -> dict[str, list[str]]:
    return {ix["name"] or "": [c or "" for c in ix["column_names"]] for ix in sa.inspect(engine).get_indexes("journal")}


def test_the_journal_has_no_index_but_its_key_and_the_downgrade_restores_bank_at(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        assert _journal_indexes(engine) == {}
        downgrade(engine, "0004_journal_no_bank_at@-1")
        assert _journal_indexes(engine) == {"ix_journal_bank_at": ["bank_id", "at"]}
        upgrade(engine)
        assert _journal_indexes(engine) == {}
    finally:
        engine.dispose()
