"""mis_adapter.feed.insert_columns and list_of (the feed's posting and issuing write
their batches by column; on PostgreSQL ints and strings travel as array text made by
one join) store and find exactly the values given, on every database: values shared
by every row or per row, a column whose values all happen to be equal, NULLs among
values, and text that PostgreSQL's array syntax would misread."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter.feed import insert_columns, list_of
from yindian_common.bulk_sql import InList
from yindian_common.db import make_engine

_md = sa.MetaData()
_t = sa.Table("feed_columns_probe", _md,
              sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                        autoincrement=True),
              sa.Column("s", sa.String(40), nullable=True),
              sa.Column("n", sa.BigInteger, nullable=True),
              sa.Column("flag", sa.Boolean, nullable=True),
              sa.Column("day", sa.Date, nullable=True))
_texts = st.one_of(st.sampled_from(["", "NULL", "null", " a ", "{x}", "a,b", 'q"uote', "back\\slash", '","',
                                    "AD-1-1", "01" + "0" * 8]),
                   st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x4e2d), max_size=12))
_ints = st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)
_days = st.one_of(st.none(), st.dates(min_value=dt.date(2000, 1, 1), max_value=dt.date(2099, 12, 31)))
_row = st.tuples(st.one_of(st.none(), _texts), st.one_of(st.none(), _ints), st.one_of(st.none(), st.booleans()), _days)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, min_size=1, max_size=8), shared_cols=st.sets(st.sampled_from(["s", "n", "flag", "day"])),
       same=st.booleans(), probe=st.lists(_texts, max_size=8))
def test_columns_store_exactly_the_rows_given(db_url: str, rows: list[tuple[object, ...]], shared_cols: set[str],
                                               same: bool, probe: list[str]) -> None:
    names = ["s", "n", "flag", "day"]
    if same:  # every row equal: each column's values all the same (sent once on PostgreSQL)
        rows = [rows[0]] * len(rows)
    # a shared column takes the first row's value in every row
    want = [tuple(rows[0][i] if c in shared_cols else r[i] for i, c in enumerate(names)) for r in rows]
    shared = {c: rows[0][i] for i, c in enumerate(names) if c in shared_cols}
    columns = {c: [r[i] for r in rows] for i, c in enumerate(names) if c not in shared_cols}
    if not columns:  # at least one per-row column gives the row count
        columns = {"n": [rows[0][1]] * len(rows)}
        shared.pop("n")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            _md.drop_all(conn)
            _md.create_all(conn)
            insert_columns(conn, _t, shared, columns)
            got = [(r.s, r.n, None if r.flag is None else bool(r.flag), r.day)
                   for r in conn.execute(sa.select(_t.c.s, _t.c.n, _t.c.flag, _t.c.day).order_by(_t.c.id))]
            assert got == want
            # list_of: exactly the listed strings are found (decoys outside the generated alphabet never are)
            conn.execute(_t.delete())
            insert_columns(conn, _t, {"n": 0}, {"s": [*probe, "\u9fa5decoy", "\u9fa5"]})
            if probe:
                found = conn.execute(sa.select(_t.c.s).where(InList(_t.c.s, "p")),
                                     {"p": list_of(conn, probe)}).scalars().all()
                assert sorted(found) == sorted(probe)
    finally:
        _md.drop_all(engine)
        engine.dispose()


def test_the_gc_threshold_is_raised_to_the_setting_and_never_lowered() -> None:
    import gc

    from mis_adapter.feed import FeedSettings, raise_gc_threshold

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, before[1], before[2])
        raise_gc_threshold(FeedSettings().gc_gen0_threshold)
        assert gc.get_threshold() == (20_000, before[1], before[2])
        raise_gc_threshold(5_000)  # a lower setting leaves the higher threshold as it is
        assert gc.get_threshold()[0] == 20_000
    finally:
        gc.set_threshold(*before)
