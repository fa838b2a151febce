"""Revision 0007_pgcpu_journal_room: on PostgreSQL a pay's outcome lands on its row's own page.

The outcome update is never HOT (it changes `state`, which the due-rows index names), but where its
new version goes still decides what it costs: on another page PostgreSQL WAL-logs a lock of the old
version, searches for room and dirties two pages. The journal's pages keep half their room for the
outcomes (fillfactor 50). Here: rows and outcomes written by the journal's own group commits (as the
writer does: each batch's rows, then their outcomes) keep each row on its page; the downgrade gives
back full pages."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from bridge import journal as jn
from bridge.journal import Entry, Journal
from bridge.journal.schema import JOURNAL_FILLFACTOR
from bridge.migrate import downgrade, upgrade
from yindian_common.db import make_engine

AT = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)
BATCH = 8
BATCHES = 40
# A PayResponse's bytes and the utility's message, about as long as a posted pay's.
BODY = bytes(range(90))


def _pages(conn: sa.Connection) -> dict[str, int]:
    rows = conn.execute(sa.text("SELECT serial, (ctid::text::point)[0]::int FROM bridge_journal"))
    return {r[0]: r[1] for r in rows}


def _options(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'bridge_journal'"))
                    .scalar_one() or [])


def _pays(engine: sa.Engine) -> tuple[dict[str, int], dict[str, int]]:
    """BATCHES group commits of BATCH new rows, each followed by the previous batch's outcomes (the writer's
    order under load); the page of every row when inserted and after its outcome."""
    journal = Journal(engine)
    before: dict[str, int] = {}
    previous: list[Entry] = []
    for b in range(BATCHES + 1):
        rows = [Entry(kind=jn.PAY, serial=f"R{b:03d}-{i}", bank_id="ICBC", amount_fen=1_000 + i, state=jn.PENDING,
                      business_date=AT.date(), created_at=AT, updated_at=AT, account_no="0100000017",
                      outlet_code="OUTLET01", teller_id="TELLER01", channel=1, bank_balance_fen=10**9)
                for i in range(BATCH)] if b < BATCHES else []
        outcomes = [jn.outcome_for(e, jn.POSTED, AT + dt.timedelta(seconds=1), status_code=0, body=BODY,
                                   message="posted") for e in previous]
        assert journal.write(rows, outcomes) == {e.key for e in rows}
        with engine.connect() as conn:
            pages = _pages(conn)
        before.update({e.serial: pages[e.serial] for e in rows})
        previous = rows
    with engine.connect() as conn:
        assert set(conn.execute(sa.text("SELECT DISTINCT state FROM bridge_journal")).scalars()) == {jn.POSTED}
        return before, _pages(conn)


def test_on_postgresql_a_pays_outcome_lands_on_its_rows_page(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        assert _options(engine) == [f"fillfactor={JOURNAL_FILLFACTOR}"]
        before, after = _pays(engine)
    finally:
        engine.dispose()
    moved = sorted(s for s in before if after[s] != before[s])
    assert len(before) == BATCH * BATCHES and len(set(before.values())) >= 5  # several pages, not one
    assert len(moved) <= len(before) // 20, moved  # at most 5 %: the last rows of a page may not fit


def test_downgrade_gives_back_full_pages(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        downgrade(engine, "0006_seals_batches")  # 0007 and every later revision undone
        assert _options(engine) == []
        upgrade(engine)
        assert _options(engine) == ["fillfactor=50"]
    finally:
        engine.dispose()
