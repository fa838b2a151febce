"""yindian_common.bulk_sql.bulk_insert / bulk_insert_returning store exactly the
rows given, whatever mix of per-row and shared values a batch has (on
PostgreSQL a column with one value in every row is sent once, not as an array)."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yindian_common.bulk_sql import InList, bulk_insert, bulk_insert_returning, list_param
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


_probe_md = sa.MetaData()
_probe = sa.Table("bulk_in_probe", _probe_md,
                  sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                            autoincrement=True),
                  sa.Column("n", sa.BigInteger, nullable=True),
                  sa.Column("s", sa.String(40), nullable=True))
# Text that PostgreSQL's array syntax would misread unquoted or unescaped, next to plain serials.
_texts = st.one_of(st.sampled_from(["", "NULL", "null", " a ", "{x}", "a,b", 'q"uote', "back\\slash", "ICBC2026",
                                    "01" + "0" * 8]),
                   st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x4e2d), max_size=12))
_ints = st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ns=st.lists(_ints, max_size=12), ss=st.lists(_texts, max_size=12))
def test_list_parameters_and_bulk_arrays_keep_every_value(db_url: str, ns: list[int], ss: list[str]) -> None:
    """Whatever form a list takes on the wire (PostgreSQL array text made by a join, or the list
    itself), `bulk_insert` stores exactly its values and `col IN list_param(...)` finds exactly the
    listed ones (decoy rows, never listed, are not found)."""
    engine = make_engine(db_url)
    int_decoys = [d for d in (0, 1, -1, 2 ** 40) if d not in ns]
    text_decoys = ["\u9fa5decoy", "\u9fa5"]  # outside the generated alphabet: no collation equates them to a listed value
    try:
        with engine.begin() as conn:
            _probe_md.drop_all(conn)
            _probe_md.create_all(conn)
            rows = [{"n": n, "s": s} for n, s in zip(ns, ss, strict=False)]
            bulk_insert(conn, _probe, rows)
            got = [(r.n, r.s) for r in conn.execute(sa.select(_probe.c.n, _probe.c.s).order_by(_probe.c.id))]
            assert got == [(r["n"], r["s"]) for r in rows]
            conn.execute(_probe.delete())
            bulk_insert(conn, _probe, [{"n": n, "s": None} for n in ns + int_decoys])
            by_n = conn.execute(sa.select(_probe.c.n).where(InList(_probe.c.n, "p")),
                                {"p": list_param(conn, ns)}).scalars().all()
            assert sorted(by_n) == sorted(ns)
            conn.execute(_probe.delete())
            bulk_insert(conn, _probe, [{"n": 0, "s": s} for s in ss + text_decoys])
            by_s = conn.execute(sa.select(_probe.c.s).where(InList(_probe.c.s, "p")),
                                {"p": list_param(conn, ss)}).scalars().all()
            assert sorted(by_s) == sorted(ss)
    finally:
        _probe_md.drop_all(engine)
        engine.dispose()
