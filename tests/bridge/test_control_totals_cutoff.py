"""The bank side of control totals counts a POSTED pay exactly when the utility's `posted_at` is before
the cutoff, to the microsecond (the utility's Timestamp truncated to microseconds, as
Timestamp.ToDatetime does), in the full read and the incremental cache alike, on SQLite, PostgreSQL
and MariaDB."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from bridge import journal as jn
from bridge.control_totals import JournalViewCache, journal_view
from yindian.v1 import billing_pb2 as pb
from yindian_common.db import make_engine

DAY = dt.date(2026, 11, 28)
CUTOFF = dt.datetime(2026, 11, 28, 9, 30, 15, 250_000, tzinfo=dt.UTC)
US = dt.timedelta(microseconds=1)


def test_a_pay_counts_when_posted_before_the_cutoff_to_the_microsecond(db_url: str) -> None:
    engine = make_engine(db_url, pool_size=2)
    try:
        jn.create_schema(engine)
        journal = jn.Journal(engine)
        posted = {  # serial: (posted_at, extra nanoseconds)
            "EARLY": (CUTOFF - US, 999), "AT": (CUTOFF, 0), "AT-NS": (CUTOFF, 1), "LATE": (CUTOFF + US, 0),
            "BEFORE-TZ": ((CUTOFF - US).astimezone(dt.timezone(dt.timedelta(hours=8))), 0)}
        outcomes = []
        for n, (serial, (at, nanos)) in enumerate(posted.items()):
            entry = jn.Entry(kind=jn.PAY, serial=serial, bank_id="ICBC", amount_fen=100 + n, state=jn.PENDING,
                             original_serial="", account_no="0100000017", business_date=DAY,
                             created_at=CUTOFF - dt.timedelta(minutes=5), updated_at=CUTOFF)
            assert journal.insert_new(entry)
            resp = pb.PayResponse(bank_serial=serial, amount_fen=100 + n, settlement_date=DAY.isoformat())
            resp.posted_at.FromDatetime(at)
            resp.posted_at.nanos += nanos
            outcomes.append(jn.outcome_for(entry, jn.POSTED, CUTOFF, status_code=0, body=resp.SerializeToString()))
        journal.record(outcomes)
        settled = CUTOFF - dt.timedelta(seconds=5)
        full = journal_view(engine, "ICBC", DAY, CUTOFF, settled)
        assert sorted(full.entries) == ["BEFORE-TZ", "EARLY"]
        assert (full.totals.posted_count, full.totals.posted_fen) == (2, 100 + 104)
        assert JournalViewCache(engine, "ICBC").view(DAY, CUTOFF, settled) == full
        naive_cutoff = CUTOFF.replace(tzinfo=None)  # SQLite and MariaDB hand back naive UTC: same answer
        assert journal_view(engine, "ICBC", DAY, naive_cutoff, settled) == full
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(jn.requests)).scalar() == 5
    finally:
        engine.dispose()
