"""Posting a batch of debit results split by account over several
transactions at once (PostgreSQL, `feed_apply_partitions`) leaves exactly the
state one transaction leaves; the split keeps each account's results together
and in order."""
from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from mis_adapter.bench_data import populate_period
from mis_adapter.db.core import AllocationRow, BillRow, JournalEntry, Payment
from mis_adapter.db.feed import DebitResultRow, FeedCursor
from mis_adapter.feed import DEBITED, DebitIn
from mis_adapter.feed_service import APPLY_PARTITION_MIN, partition_by_account
from mis_adapter.issue_bills import issue_bills
from tests.mis_adapter.test_feed_support import RawFeed, debited, insufficient
from tests.support.databases import fresh_database
from tests.support.mis_data import NOON, running_adapter

PERIOD = "202611"
FAST = {"feed_heartbeat_s": 0.2, "feed_lease_ttl_s": 5.0, "feed_poll_interval_s": 0.05}
HOUSEHOLDS = 3 * APPLY_PARTITION_MIN  # one message large enough to be split


@given(st.lists(st.tuples(st.sampled_from(["0100000017", "0100000025", "0200000011", "0300000019"]),
                          st.integers(1, 10_000)), max_size=3 * APPLY_PARTITION_MIN),
       st.integers(1, 4))
def test_split_keeps_each_accounts_results_together_and_in_order(rows: list[tuple[str, int]], parts_max: int) -> None:
    results = [DebitIn(i + 1, DEBITED, f"AD-{i + 1}", fen, i + 1, acct) for i, (acct, fen) in enumerate(rows)]
    parts = partition_by_account(results, parts_max)
    assert 1 <= len(parts) <= parts_max and (all(parts) or parts == [[]] == [results])
    assert sorted(r.seq for p in parts for r in p) == [r.seq for r in results]
    for p in parts:
        assert [r.seq for r in p] == sorted(r.seq for r in p), "result order kept"
    owners = {r.account_no: i for i, p in enumerate(parts) for r in p}
    assert all(owners[r.account_no] == i for i, p in enumerate(parts) for r in p), "an account in one part"
    if len(parts) > 1:
        assert len(results) >= len(parts) * APPLY_PARTITION_MIN


def _state(engine: sa.Engine) -> dict[str, list[tuple[object, ...]]]:
    """What a user would notice, without generated ids and instants."""
    b, p, a, r, j = (BillRow.__table__, Payment.__table__, AllocationRow.__table__, DebitResultRow.__table__,
                     JournalEntry.__table__)
    with engine.connect() as conn:
        return {
            "bills": sorted(conn.execute(sa.select(b.c.account_no, b.c.status, b.c.principal_paid_fen, b.c.dunning,
                                                   b.c.paid_on)).all()),
            "payments": sorted(conn.execute(sa.select(p.c.bank_serial, p.c.account_no, p.c.amount_fen, p.c.state,
                                                      p.c.arrears_after_fen, p.c.prepaid_after_fen,
                                                      p.c.prepaid_added_fen)).all()),
            "allocations": sorted(conn.execute(sa.select(p.c.bank_serial, b.c.account_no, a.c.late_fee_fen,
                                                         a.c.principal_fen)
                                               .join(p, p.c.payment_id == a.c.payment_id)
                                               .join(b, b.c.bill_id == a.c.bill_id)).all()),
            "results": sorted(conn.execute(sa.select(r.c.seq, r.c.outcome, r.c.bank_serial, r.c.amount_fen,
                                                     r.c.account_no, r.c.disposition)).all()),
            "journal": sorted(conn.execute(sa.select(j.c.rpc, j.c.serial, j.c.account_no, j.c.amount_fen,
                                                     j.c.outcome)).all()),
            "cursor": list(conn.execute(sa.select(FeedCursor.__table__.c.acked_through_seq)).all()),
        }


def _run(url: str, partitions: int) -> dict[str, list[tuple[object, ...]]]:
    with running_adapter(url, feed_apply_partitions=partitions, **FAST) as ra:
        populate_period(ra.engine, HOUSEHOLDS, PERIOD, now=NOON, with_banks=False)
        issue_bills(ra.engine, ra.clock, PERIOD)
        feed = RawFeed(ra.stub)
        notices = feed.notices(HOUSEHOLDS)
        # every 7th household cannot pay; one message, split on PostgreSQL when partitions > 1
        feed.send([insufficient(n) if n.seq % 7 == 0 else debited(n) for n in notices])
        feed.until_cursor(notices[-1].seq)
        feed.send([debited(n) for n in notices[:5]])  # duplicates: ignored
        feed.close()
        return _state(ra.engine)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_split_posting_leaves_what_one_transaction_leaves(backend: str, tmp_path: Path) -> None:
    with fresh_database(backend, tmp_path, "split") as split_url, fresh_database(backend, tmp_path, "one") as one_url:
        split, one = _run(split_url, 2), _run(one_url, 1)
    assert split == one
    assert len(one["payments"]) == len([s for s in one["results"] if s[1] == DEBITED]) > 0
    assert one["cursor"] == [(one["results"][-1][0],)]
