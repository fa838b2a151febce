"""The MIS schema: SQLAlchemy 2.x declarative models, one module per area.
Alembic migrations (mis_adapter/migrations) are written against these.
Hot paths use the tables through SQLAlchemy Core (`Model.__table__`)."""
from mis_adapter.db import arrears, audit, core, dunning, feed, front, link, recon  # noqa: F401  (register tables)
from mis_adapter.db.base import Base

metadata = Base.metadata

__all__ = ["Base", "metadata", "arrears", "audit", "core", "dunning", "feed", "front", "link", "recon"]
