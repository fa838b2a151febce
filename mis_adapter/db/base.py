"""Declarative base and column types shared by the MIS models."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase

# BIGINT everywhere, but INTEGER on SQLite so that the key is the rowid alias
# and autoincrements.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Money = sa.BigInteger  # integer fen, always

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)


def table_of(model: type[Base]) -> sa.Table:
    """A model's Table, typed as one, for SQLAlchemy Core statements."""
    table = model.__table__
    assert isinstance(table, sa.Table)
    return table
