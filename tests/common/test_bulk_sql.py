"""yindian_common.bulk_sql.bulk_insert / bulk_insert_returning store exactly the
rows given, whatever mix of per-row and shared values a batch has (on
PostgreSQL a column with one value in every row is sent once, not as an array)."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from yindian_common.bulk_sql import bulk_insert, bulk_insert_returning
from yindian_common.db import make_engine

NOW = dt.datetime(2026, 11, 29, 2, 0, 0, tzinfo=dt.UTC)  # whole seconds: a plain MariaDB DATETIME keeps no more


def _table() -> tuple[sa.MetaData, sa.Table]:
    md = sa.MetaData()
    t = sa.Table("bulk_probe", md,
                 sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                           autoincrement=True),
                 sa.Column("name", sa.String(32), nullable=True),
                 sa.Column("fen", sa.BigInteger, nullable=True),
                 sa.Column("flag", sa.Boolean, nullable=True),
                 sa.Column("at", sa.DateTime(timezone=True), nullable=True),
                 sa.Column("day", sa.Date, nullable=True))
    return md, t


def _aware(v: dt.datetime | None) -> dt.datetime | None:
    return None if v is None else (v if v.tzinfo else v.replace(tzinfo=dt.UTC))


def test_bulk_insert_keeps_every_value(db_url: str) -> None:
    md, t = _table()
    engine = make_engine(db_url)
    tricky = 'a"b\\c,{d} NULL'
    batches = [
        # shared and per-row columns mixed; a shared NULL; text that array syntax would misread
        [{"name": tricky, "fen": i, "flag": True, "at": NOW, "day": None} for i in range(3)],
        # every column shared by every row (identical rows)
        [{"name": "NULL", "fen": 7, "flag": False, "at": NOW, "day": dt.date(2026, 12, 1)}] * 2,
        # one row
        [{"name": "", "fen": None, "flag": None, "at": None, "day": dt.date(2026, 1, 31)}],
        # nothing shared; False and 0 in the same batch as True and 1
        [{"name": "x", "fen": 0, "flag": False, "at": NOW, "day": None},
         {"name": None, "fen": 1, "flag": True, "at": NOW + dt.timedelta(seconds=1), "day": dt.date(2026, 2, 1)}],
    ]
    try:
        with engine.begin() as conn:
            md.create_all(conn)
            for rows in batches[:2]:
                bulk_insert(conn, t, rows)
            returned = bulk_insert_returning(conn, t, batches[2], ("id", "name"))
            bulk_insert(conn, t, batches[3])
        with engine.connect() as conn:
            got = [(r.name, r.fen, None if r.flag is None else bool(r.flag), _aware(r.at), r.day)
                   for r in conn.execute(sa.select(t).order_by(t.c.id))]
        want = [(r["name"], r["fen"], r["flag"], r["at"], r["day"]) for rows in batches for r in rows]
        assert got == want
        if returned is not None:  # PostgreSQL: the new row's generated id, as stored
            assert returned == [(6, "")]
    finally:
        md.drop_all(engine)
        engine.dispose()
