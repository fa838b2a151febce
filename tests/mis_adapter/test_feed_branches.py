"""BillFeed scenarios only the branch topology has (issue 10): one gapless
sequence per bank at the front over three branch outboxes (also on
MariaDB), results and their money posted in each bill's own branch,
duplicates and resume interleaved across branches, a debit serial that is
one payment across branches, and bills issued in one branch after the
stream started delivered in order. The whole single-database feed suite
(test_feed.py) also runs on three branch databases."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from mis_adapter.bench_data import populate_period
from mis_adapter.db.core import BillRow, Payment
from mis_adapter.db.feed import DebitResultRow, FeedCursor
from mis_adapter.issue_bills import issue_bills
from tests.mis_adapter.test_feed_support import RawFeed, debited, insufficient, subscribe
from tests.support.databases import fresh_database
from tests.support.mis_data import NOON, RunningAdapter, running_adapter
from yindian.v1 import billing_pb2 as pb

pytestmark = [pytest.mark.timeout(180), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema

PERIOD = "202611"
FAST = {"feed_heartbeat_s": 0.2, "feed_lease_ttl_s": 5.0, "feed_poll_interval_s": 0.05}
CODES = ("01", "02", "03")
T_PAY = Payment.__table__
T_BILLS = BillRow.__table__
T_RES = DebitResultRow.__table__


@contextmanager
def three_branches(backend: str, tmp_path: Path) -> Iterator[tuple[RunningAdapter, list[sa.Engine]]]:
    with ExitStack() as stack:
        main, b02, b03 = (stack.enter_context(fresh_database(backend, tmp_path, label, schema="mis"))
                          for label in ("main", "b02", "b03"))
        ra = stack.enter_context(running_adapter(main, branch_db=[f"02={b02}", f"03={b03}"], **FAST))
        yield ra, [ra.ctx.router.engine_for_branch(c) for c in CODES]


def issue(ra: RunningAdapter, engines: list[sa.Engine], per_branch: int, first_serial: int = 1) -> None:
    for code, engine in zip(CODES, engines, strict=True):
        populate_period(engine, per_branch, PERIOD, now=NOON, with_banks=False, branch=code,
                        first_serial=first_serial)
        issue_bills(engine, ra.clock, PERIOD)


def total(engines: list[sa.Engine], q: sa.Select) -> int:  # type: ignore[type-arg]
    out = 0
    for e in engines:
        with e.connect() as conn:
            out += int(conn.execute(q).scalar_one() or 0)
    return out


def per_db(engines: list[sa.Engine], q: sa.Select) -> list[int]:  # type: ignore[type-arg]
    return [total([e], q) for e in engines]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_one_gapless_sequence_and_results_in_each_bills_branch(backend: str, tmp_path: Path) -> None:
    with three_branches(backend, tmp_path) as (ra, engines):
        issue(ra, engines, 10)
        feed = RawFeed(ra.stub)
        notices = feed.notices(30)
        assert [n.seq for n in notices] == list(range(1, 31))
        assert sorted(n.account_no[:2] for n in notices) == ["01"] * 10 + ["02"] * 10 + ["03"] * 10
        assert len({n.bill_id for n in notices if n.account_no[:2] == "02"}) == 10
        debits = [n for n in notices if n.seq % 3]
        feed.send([debited(n) for n in debits])
        feed.send([insufficient(n) for n in notices if not n.seq % 3])
        feed.until_cursor(30)
        feed.close()
        count_ad = sa.select(sa.func.count()).select_from(T_PAY).where(T_PAY.c.channel == "AUTO_DEBIT")
        # each debit posted once, in its bill's own branch
        expected = [sum(1 for n in debits if n.account_no[:2] == c) for c in CODES]
        assert per_db(engines, count_ad) == expected
        assert total(engines, sa.select(sa.func.sum(T_PAY.c.amount_fen))) == sum(n.amount_fen for n in debits)
        assert total(engines, sa.select(sa.func.count()).select_from(T_BILLS).where(T_BILLS.c.status == "PAID")) \
            == len(debits)
        assert total(engines, sa.select(sa.func.count()).select_from(T_BILLS)
                     .where(T_BILLS.c.status == "UNPAID", T_BILLS.c.dunning == sa.true())) == 30 - len(debits)
        assert total(engines, sa.select(sa.func.count()).select_from(T_RES)) == 30
        # the global cursor is the front's (the primary here)
        with ra.ctx.router.front.connect() as conn:  # type: ignore[union-attr]
            assert conn.execute(sa.select(FeedCursor.__table__.c.acked_through_seq)).scalar_one() == 30
        # GetPayment finds an auto-debit wherever it posted
        some = next(n for n in debits if n.account_no[:2] == "03")
        st = ra.stub.GetPayment(pb.GetPaymentRequest(bank_serial=f"AD-{some.seq}"), metadata=ra.md())
        assert st.state == pb.PAYMENT_STATE_POSTED and st.payment.account_no == some.account_no


@pytest.mark.parametrize("backend", ["sqlite"])  # test_feed.py runs these rules on PostgreSQL branches too
def test_duplicates_conflicts_and_resume_across_branches(backend: str, tmp_path: Path) -> None:
    with three_branches(backend, tmp_path) as (ra, engines):
        issue(ra, engines, 3)
        feed = RawFeed(ra.stub)
        ns = feed.notices(9)
        # out of order, across branches; the cursor must not pass 1
        feed.send([debited(ns[4]), insufficient(ns[7])])
        feed.send([debited(ns[4])])  # an identical duplicate: no effect
        feed.send([debited(n) for n in ns[:4]])
        feed.until_cursor(5)
        feed.close()
        count = sa.select(sa.func.count()).select_from(T_PAY)
        assert total(engines, count) == 5
        # resume after the stored cursor: 6.. again, nothing before
        feed = subscribe(ra.stub)
        assert [n.seq for n in feed.notices(4)] == [6, 7, 8, 9]
        feed.close()
        # an old resume point redelivers; the stored answers make them duplicates
        feed = subscribe(ra.stub, resume=2)
        again = feed.notices(7)
        assert [n.seq for n in again] == list(range(3, 10))
        assert [(n.bill_id, n.account_no) for n in again] == [(n.bill_id, n.account_no) for n in ns[2:]]
        feed.send([debited(n) for n in again[:3]])       # 3, 4, 5: as stored
        feed.send([insufficient(again[5])])               # 8: as stored
        feed.send([debited(again[3]), debited(again[4]), debited(again[6])])
        feed.until_cursor(9)
        assert total(engines, count) == 8
        # a duplicate that differs from the stored result is refused
        feed.send([debited(ns[0], serial="OTHER-1")])
        assert feed.error().code() == grpc.StatusCode.ALREADY_EXISTS
        assert total(engines, count) == 8


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_debit_serial_is_one_payment_across_branches(backend: str, tmp_path: Path) -> None:
    """A debit reusing a serial the bank already used on another branch's account is refused, nothing posted."""
    with three_branches(backend, tmp_path) as (ra, engines):
        issue(ra, engines, 1)
        feed = RawFeed(ra.stub)
        ns = feed.notices(3)
        feed.send([debited(ns[0], serial="SAME-1")])
        feed.until_cursor(1)
        feed.send([debited(ns[2], serial="SAME-1")])  # the bill of branch 03, the serial of branch 01's debit
        assert feed.error().code() == grpc.StatusCode.ALREADY_EXISTS
        assert per_db(engines, sa.select(sa.func.count()).select_from(T_PAY)) == [1, 0, 0]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_second_subscriber_refused_and_later_bills_follow_in_order(backend: str, tmp_path: Path) -> None:
    with three_branches(backend, tmp_path) as (ra, engines):
        issue(ra, engines, 2)
        feed = RawFeed(ra.stub)
        ns = feed.notices(6)
        second = RawFeed(ra.stub)
        err = second.error()
        assert err.code() == grpc.StatusCode.ABORTED
        # bills issued in branch 02 only, while the stream runs: they follow, gapless
        populate_period(engines[1], 4, PERIOD, now=NOON, with_banks=False, branch="02", first_serial=100)
        issue_bills(engines[1], ra.clock, PERIOD)
        later = feed.notices(4)
        assert [n.seq for n in later] == [7, 8, 9, 10] and {n.account_no[:2] for n in later} == {"02"}
        feed.send([debited(n) for n in ns + later])
        feed.until_cursor(10)
        feed.close()
        assert per_db(engines, sa.select(sa.func.count()).select_from(T_PAY)) == [2, 6, 2]
