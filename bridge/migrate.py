"""Schema migrations of the bridge journal: `alembic upgrade heads` from code,
at every start (bridge/migrations; its own version table).

A journal created before migrations existed (by create_all, holding exactly
revision 0001's tables) is stamped 0001 first, then upgraded like any other."""
from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

from yindian_common.db import require_case_sensitive_serials

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "bridge_alembic_version"  # as in migrations/env.py
PRE_MIGRATION_REVISION = "0001"  # what create_all made: bridge_journal and bridge_audit


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def upgrade(engine: Engine) -> None:
    require_case_sensitive_serials(engine)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        tables = set(sa.inspect(conn).get_table_names())
        if "bridge_journal" in tables and VERSION_TABLE not in tables:
            command.stamp(cfg, PRE_MIGRATION_REVISION)
        command.upgrade(cfg, "heads")


def downgrade(engine: Engine, target: str) -> None:
    """`alembic downgrade target` (e.g. "0005_journal_lean_indexes@-1": that revision undone)."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, target)
