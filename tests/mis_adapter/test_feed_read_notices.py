"""mis_adapter.feed.read_notices (on PostgreSQL read straight through psycopg, in binary)
answers exactly the outbox rows after the cursor, in order, each field as stored, with
the withdrawn ones flagged; and a hole in the outbox stops the stream, naming the seq,
on every database."""
from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from mis_adapter import feed
from mis_adapter.db.base import table_of
from mis_adapter.db.link import FeedWithdrawal
from mis_adapter.migrate import upgrade
from yindian_common.db import make_engine

ISSUED = dt.datetime(2026, 11, 30, 1, 2, 3, tzinfo=dt.UTC)


def _outbox(conn: sa.Connection, seqs: list[int]) -> None:
    feed.insert_columns(conn, feed.T_OUT, {"bank_id": "ICBC", "period": "202611", "issued_at": ISSUED}, {
        "seq": seqs, "bill_id": [1_000 + s for s in seqs], "account_no": [f"01{s:08d}" for s in seqs],
        "kwh": [2 ** 40 + s for s in seqs], "amount_fen": [5_000 + s % 3 for s in seqs],
        "due_date": [dt.date(2026, 12, 20) + dt.timedelta(days=s % 2) for s in seqs]})


def test_notices_are_the_outbox_rows_after_the_cursor_with_the_withdrawn_flagged(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            _outbox(conn, list(range(1, 8)))
            conn.execute(table_of(FeedWithdrawal).insert(), [
                {"bank_id": "ICBC", "seq": s, "account_no": f"01{s:08d}", "agreement_id": 1, "withdrawn_at": ISSUED}
                for s in (3, 6)])
        with feed.reading(engine) as conn:
            got = feed.read_notices(conn, "ICBC", 2, 4)
            assert feed.read_notices(conn, "ICBC", 7, 4) == []
        # SQLite and MariaDB keep instants naive, in UTC (the stream converts them as UTC: feed_service._ts)
        assert [n._replace(issued_at=n.issued_at if n.issued_at.tzinfo else n.issued_at.replace(tzinfo=dt.UTC))
                for n in got] == [
            (s, 1_000 + s, f"01{s:08d}", "202611", 2 ** 40 + s, 5_000 + s % 3,
             dt.date(2026, 12, 20) + dt.timedelta(days=s % 2), ISSUED, s in (3, 6)) for s in (3, 4, 5, 6)]
        assert all(type(n) is feed.Notice for n in got)
        if engine.dialect.name == "postgresql":
            assert all(n.issued_at == ISSUED and n.issued_at.tzinfo is not None for n in got)
    finally:
        engine.dispose()


def test_a_hole_in_the_outbox_is_named_not_skipped(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            _outbox(conn, [1, 2, 3, 5, 6])
        with feed.reading(engine) as conn:
            assert [n.seq for n in feed.read_notices(conn, "ICBC", 0, 3)] == [1, 2, 3]
            with pytest.raises(RuntimeError, match="gap before seq 5"):
                feed.read_notices(conn, "ICBC", 1, 4)
            with pytest.raises(RuntimeError, match="gap before seq 5"):
                feed.read_notices(conn, "ICBC", 3, 2)
    finally:
        engine.dispose()
