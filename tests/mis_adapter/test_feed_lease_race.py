"""A stream that starts as the bank's previous stream ends takes the lease, never fails with an
unexpected error (found by CI: test_feed's resume scenario answered UNKNOWN "No row was found when
one was required" on PostgreSQL when the old stream's release landed between the new stream's
insert and its read of the lease)."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from mis_adapter import feed
from mis_adapter.migrate import upgrade
from tests.support.databases import fresh_database
from yindian_common.db import make_engine

NOW = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)


@pytest.fixture
def pg_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    with fresh_database("postgresql", tmp_path) as url:
        engine = make_engine(url)
        upgrade(engine)
        yield engine
        engine.dispose()


def _holder(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(feed.T_LEASE.c.holder).where(feed.T_LEASE.c.bank_id == "B1")).scalar()


def test_a_lease_released_between_the_insert_and_the_read_is_taken(pg_engine: sa.Engine) -> None:
    feed.acquire_lease(pg_engine, "B1", "old-stream", NOW, 30.0)
    other = make_engine(pg_engine.url.render_as_string(hide_password=False))
    released: list[bool] = []

    def release_before_the_read(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # the old stream ends exactly after the new one's insert found its row
        if not released and statement.lstrip().upper().startswith("SELECT FEED_LEASES.HOLDER"):
            feed.release_lease(other, "B1", "old-stream")
            released.append(True)

    sa.event.listen(pg_engine, "before_cursor_execute", release_before_the_read)
    try:
        feed.acquire_lease(pg_engine, "B1", "new-stream", NOW + dt.timedelta(seconds=1), 30.0)
    finally:
        sa.event.remove(pg_engine, "before_cursor_execute", release_before_the_read)
        other.dispose()
    assert released == [True]
    assert _holder(pg_engine) == "new-stream"


def test_a_live_lease_held_by_another_stream_still_refuses(pg_engine: sa.Engine) -> None:
    feed.acquire_lease(pg_engine, "B1", "old-stream", NOW, 30.0)
    with pytest.raises(feed.FeedBusy):
        feed.acquire_lease(pg_engine, "B1", "new-stream", NOW + dt.timedelta(seconds=1), 30.0)
    assert _holder(pg_engine) == "old-stream"
