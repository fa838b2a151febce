"""Schema migrations: `alembic upgrade heads` on a branch database, from code.

Upgrading to every head lets independent features add their tables as sibling
revisions of the same parent (each names its own down_revision); a merge
revision is only needed when one must follow another."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

from yindian_common.db import require_case_sensitive_serials

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine) -> None:
    require_case_sensitive_serials(engine)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")


def downgrade(engine: Engine, target: str) -> None:
    """`alembic downgrade target` (e.g. "0004_bills_hot@-1": that revision undone) on a branch database."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, target)
