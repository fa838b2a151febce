"""BillFeed against a real in-process mis_adapter on loopback and a real
database: delivery, results and their money effects, refusals, resume,
one stream per bank, the window bound.

Every scenario runs on one database and on three branch databases (the
`topology` fixture, tests.support.topology): there the bills are issued in
each branch, the bank sees one gapless sequence, and every count and fen is
summed over the branch databases (test_feed_branches.py adds scenarios
only the branch topology has). Scenarios whose SQL is the single database's
(validation, resume cursor, lease, window) run their branch variant on
SQLite only (`topology_lite`), to keep CI short."""
from __future__ import annotations

import grpc
import pytest
import sqlalchemy as sa

from mis_adapter.bench_data import populate_period
from mis_adapter.db.core import BillRow, Customer, JournalEntry, Payment
from mis_adapter.db.feed import DebitResultRow, FeedCursor, RefundRow
from mis_adapter.issue_bills import issue_bills
from tests.mis_adapter.test_feed_support import RawFeed, debited, insufficient, subscribe
from tests.support.mis_data import NOON, RunningAdapter, running_adapter
from tests.support.topology import Topology, split_evenly, total
from yindian.v1 import billing_pb2 as pb
from yindian_common.status import error_info

pytestmark = pytest.mark.migrated("mis")  # running_adapter needs the MIS schema

PERIOD = "202611"
FAST = {"feed_heartbeat_s": 0.2, "feed_lease_ttl_s": 5.0, "feed_poll_interval_s": 0.05}
T_PAY = Payment.__table__
T_BILLS = BillRow.__table__
T_RES = DebitResultRow.__table__


def _adapter(topo: Topology, **overrides: object):  # type: ignore[no-untyped-def]
    return running_adapter(topo.db, branch_db=topo.branch_db, **{**FAST, **overrides})


def _count(ra: RunningAdapter, q: sa.Select) -> int:  # type: ignore[type-arg]
    """Summed over every MIS database of the adapter."""
    return total(ra.ctx.router.engines(), q)


def _codes(ra: RunningAdapter) -> tuple[str, ...]:
    return ("01", "02", "03") if ra.ctx.router.split else ("01",)


def _issue(ra: RunningAdapter, n: int) -> None:
    """n households' bills, spread evenly over the topology's branches."""
    for code, k in zip(_codes(ra), split_evenly(n, len(_codes(ra))), strict=True):
        engine = ra.ctx.router.engine_for_branch(code)
        populate_period(engine, k, PERIOD, now=NOON, with_banks=False, branch=code)
        issue_bills(engine, ra.clock, PERIOD)


def _one_branch(ra: RunningAdapter) -> tuple[str, sa.Engine]:
    """Where a scenario about one account or one issuer runs: a branch database of its own when there are
    several (not the front's), else the one database."""
    code = _codes(ra)[-1]
    return code, ra.ctx.router.engine_for_branch(code)


@pytest.mark.timeout(120)
def test_notices_results_and_money(topology: Topology) -> None:
    with _adapter(topology) as ra:
        _issue(ra, 30)
        feed = RawFeed(ra.stub)
        notices = feed.notices(30)
        assert [n.seq for n in notices] == list(range(1, 31))
        assert all(n.period == PERIOD and n.amount_fen > 0 and n.due_date == "2026-12-18" for n in notices)
        feed.send([debited(n) for n in notices[:20]])
        feed.send([insufficient(n) for n in notices[20:]])
        feed.until_cursor(30)
        feed.close()
        assert _count(ra, sa.select(sa.func.count()).select_from(T_PAY).where(T_PAY.c.channel == "AUTO_DEBIT")) == 20
        paid_fen = _count(ra, sa.select(sa.func.sum(T_PAY.c.amount_fen)))
        assert paid_fen == sum(n.amount_fen for n in notices[:20])
        assert _count(ra, sa.select(sa.func.count()).select_from(T_BILLS).where(T_BILLS.c.status == "PAID")) == 20
        assert _count(ra, sa.select(sa.func.count()).select_from(T_BILLS)
                      .where(T_BILLS.c.status == "UNPAID", T_BILLS.c.dunning == sa.true())) == 10
        assert _count(ra, sa.select(sa.func.count()).select_from(JournalEntry.__table__)
                      .where(JournalEntry.__table__.c.rpc == "DEBIT")) == 30
        # the bank's one cursor: in the (front) primary database
        assert total([ra.engine], sa.select(FeedCursor.__table__.c.acked_through_seq)) == 30
        # The bulk path allocates exactly as the allocation rule does for these accounts.
        from mis_adapter.allocation import BillDue, allocate_payment
        from mis_adapter.db.core import AllocationRow
        allocs = []
        for e in ra.ctx.router.engines():
            with e.connect() as conn:
                allocs += conn.execute(sa.select(AllocationRow.__table__.c.bill_id,
                                                 AllocationRow.__table__.c.late_fee_fen,
                                                 AllocationRow.__table__.c.principal_fen, T_PAY.c.amount_fen)
                                       .join(T_PAY, T_PAY.c.payment_id == AllocationRow.__table__.c.payment_id)).all()
        assert len(allocs) == 20
        for bill_id, fee, principal, amount in allocs:
            rule = allocate_payment(amount, [BillDue(bill_id, PERIOD, 0, amount)])
            assert [(a.bill_id, a.late_fee_fen, a.principal_fen) for a in rule.allocations] == [(bill_id, fee, principal)]
            assert rule.prepaid_fen == 0
        # The account now owes nothing and the payment is a normal one: QueryAccount and GetPayment see it.
        q = ra.stub.QueryAccount(pb.QueryAccountRequest(account_no=notices[0].account_no), metadata=ra.md())
        assert q.arrears_fen == 0
        got = ra.stub.GetPayment(pb.GetPaymentRequest(bank_serial="AD-1"), metadata=ra.md())
        assert got.state == pb.PAYMENT_STATE_POSTED and got.payment.amount_fen == notices[0].amount_fen


@pytest.mark.timeout(120)
def test_bad_results_are_refused_without_effect(topology_lite: Topology) -> None:
    with _adapter(topology_lite) as ra:
        _issue(ra, 5)
        cases = [
            ([pb.DebitResult(seq=99, outcome=pb.DEBIT_OUTCOME_DEBITED, bank_serial="X1", amount_fen=1)],
             grpc.StatusCode.INVALID_ARGUMENT, "results[0].seq"),
            (None, grpc.StatusCode.INVALID_ARGUMENT, "results[1].amount_fen"),
            (None, grpc.StatusCode.INVALID_ARGUMENT, "results[0].outcome"),
            (None, grpc.StatusCode.INVALID_ARGUMENT, "results[0].bank_serial"),
        ]
        for results, code, field in cases:
            feed = subscribe(ra.stub)
            ns = feed.notices(5)
            if results is None and field == "results[1].amount_fen":
                results = [debited(ns[0]), pb.DebitResult(seq=2, outcome=pb.DEBIT_OUTCOME_DEBITED,
                                                           bank_serial="X2", amount_fen=ns[1].amount_fen + 1)]
            elif results is None and field == "results[0].outcome":
                results = [pb.DebitResult(seq=1, bank_serial="X3", amount_fen=ns[0].amount_fen)]
            elif results is None:
                results = [debited(ns[0], serial="bad serial!")]
            feed.send(results)
            err = feed.error()
            assert err.code() == code
            info = error_info(err)
            assert info is not None and info.metadata["field"] == field
            assert _count(ra, sa.select(sa.func.count()).select_from(T_PAY)) == 0, "nothing written"
            assert _count(ra, sa.select(sa.func.count()).select_from(T_RES)) == 0


@pytest.mark.timeout(120)
def test_duplicates_out_of_order_and_conflicts(topology: Topology) -> None:
    with _adapter(topology) as ra:
        _issue(ra, 6)
        feed = RawFeed(ra.stub)
        ns = feed.notices(6)
        # Out of order: 3 and 2 first; the cursor must not pass 1.
        feed.send([debited(ns[2]), insufficient(ns[1])])
        feed.send([debited(ns[2])])  # an identical duplicate: no effect
        feed.send([debited(ns[0])])
        feed.until_cursor(3)
        feed.send([debited(ns[3]), debited(ns[3]), debited(ns[4]), insufficient(ns[5])])
        feed.until_cursor(6)
        assert _count(ra, sa.select(sa.func.count()).select_from(T_PAY)) == 4
        # A duplicate that differs from the stored result is refused.
        feed.send([debited(ns[0], serial="OTHER-1")])
        err = feed.error()
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        assert _count(ra, sa.select(sa.func.count()).select_from(T_PAY)) == 4


@pytest.mark.timeout(120)
def test_resume_with_old_future_and_no_cursor(topology_lite: Topology) -> None:
    with _adapter(topology_lite) as ra:
        _issue(ra, 10)
        feed = RawFeed(ra.stub)
        ns = feed.notices(10)
        feed.send([debited(n) for n in ns[:4]])
        feed.until_cursor(4)
        feed.close()
        # No resume point: after the stored cursor.
        feed = subscribe(ra.stub)
        assert [n.seq for n in feed.notices(6)] == list(range(5, 11))
        feed.close()
        # A future cursor is clamped to the stored one: nothing unacknowledged is skipped.
        feed = subscribe(ra.stub, resume=9)
        assert feed.notices(1)[0].seq == 5
        feed.close()
        feed = subscribe(ra.stub, resume=10_000)
        assert feed.notices(1)[0].seq == 5
        feed.close()
        # An old cursor redelivers; the bank's answers for those are duplicates and change nothing.
        feed = subscribe(ra.stub, resume=1)
        again = feed.notices(9)
        assert [n.seq for n in again] == list(range(2, 11))
        feed.send([debited(n) for n in again[:3]])  # seqs 2..4: same results as stored
        feed.send([debited(n) for n in again[3:]])
        feed.until_cursor(10)
        feed.close()
        assert _count(ra, sa.select(sa.func.count()).select_from(T_PAY)) == 10


@pytest.mark.timeout(120)
def test_second_subscriber_is_refused_until_the_first_ends(topology_lite: Topology) -> None:
    with _adapter(topology_lite) as ra:
        _issue(ra, 3)
        first = RawFeed(ra.stub)
        first.notices(3)
        second = RawFeed(ra.stub)
        err = second.error()
        assert err.code() == grpc.StatusCode.ABORTED
        info = error_info(err)
        assert info is not None and info.reason == "FEED_ALREADY_ACTIVE"
        # Another bank is not affected.
        other = subscribe(ra.stub, bank="ABC", attempts=1)
        other.close()
        first.close()
        third = subscribe(ra.stub)  # the first stream's end releases the lease
        assert [n.seq for n in third.notices(3)] == [1, 2, 3]
        third.close()


@pytest.mark.timeout(120)
def test_a_bank_that_stops_reading_holds_at_most_the_window(topology_lite: Topology) -> None:
    with _adapter(topology_lite, feed_window_max=10, feed_notice_batch_max=4) as ra:
        _issue(ra, 40)
        feed = RawFeed(ra.stub)
        ns = feed.notices(10)
        assert [n.seq for n in ns] == list(range(1, 11))
        # Nothing more than the window while unacknowledged: only heartbeats follow.
        beats_before = feed.heartbeats
        for _ in range(5):
            assert feed.next_message().WhichOneof("body") == "heartbeat"
        assert feed.heartbeats == beats_before + 5
        # An ack of 2..10 without 1 opens nothing: the window counts from the contiguous point.
        feed.send([debited(n) for n in ns[1:]])
        for _ in range(3):
            assert feed.next_message().WhichOneof("body") == "heartbeat"
        feed.send([debited(ns[0])])
        more = feed.notices(10)
        assert [n.seq for n in more] == list(range(11, 21))
        feed.close()


@pytest.mark.timeout(120)
def test_debit_for_a_bill_settled_elsewhere_becomes_refundable_credit(topology: Topology) -> None:
    with _adapter(topology) as ra:
        _issue(ra, 3)
        feed = RawFeed(ra.stub)
        ns = feed.notices(3)
        code, e = _one_branch(ra)
        n = next(x for x in ns if x.account_no[:2] == code)
        # The customer pays at the counter meanwhile.
        ra.stub.Pay(pb.PayRequest(bank_serial="CTR-1", account_no=n.account_no, amount_fen=n.amount_fen,
                                  outlet_code="O1", teller_id="T1", channel=pb.CHANNEL_COUNTER), metadata=ra.md())
        feed.send([debited(x) for x in ns])
        feed.until_cursor(3)
        feed.close()
        assert _count(ra, sa.select(sa.func.count()).select_from(RefundRow.__table__)) == 1
        serial = f"AD-{n.seq}"
        with e.connect() as conn:  # everything in the bill's own database
            refund = conn.execute(sa.select(RefundRow.__table__)).one()
            outbox_seq = conn.execute(sa.text("SELECT seq FROM feed_outbox WHERE bill_id = :b"),
                                      {"b": n.bill_id}).scalar_one()
            prepaid = conn.execute(sa.select(Customer.__table__.c.prepaid_fen)
                                   .where(Customer.__table__.c.account_no == n.account_no)).scalar_one()
            pay = conn.execute(sa.select(T_PAY).where(T_PAY.c.bank_serial == serial)).one()
        assert (refund.seq, refund.amount_fen, refund.bank_serial) == (outbox_seq, n.amount_fen, serial)
        assert prepaid == n.amount_fen
        assert pay.prepaid_added_fen == n.amount_fen and pay.channel == "AUTO_DEBIT"


@pytest.mark.timeout(120)
def test_debit_on_an_account_with_older_arrears_follows_the_allocation_rule(topology: Topology) -> None:
    """Not the bulk path: the general payment path pays the oldest bill first."""
    import datetime as dt

    from tests.support.mis_data import BillSpec, add_account
    with _adapter(topology) as ra:
        code, e = _one_branch(ra)
        populate_period(e, 1, PERIOD, now=NOON, with_banks=False, branch=code)
        old = add_account(e, code, 500, [BillSpec("202609", 5_000, dt.date(2026, 10, 25))])
        with e.begin() as conn:
            conn.execute(sa.text("INSERT INTO meters (meter_no, account_no, installed_on) VALUES ('MX', :a, '2020-01-01')"),
                         {"a": old})
            conn.execute(sa.text("INSERT INTO readings (meter_no, account_no, period, register_kwh, kwh, read_on, billed)"
                                 " VALUES ('MX', :a, :p, 100, 100, '2026-11-28', :f)"), {"a": old, "p": PERIOD, "f": False})
            conn.execute(sa.text("INSERT INTO agreements (account_no, bank_id, signed_on, active) "
                                 "VALUES (:a, 'ICBC', '2020-01-01', :t)"), {"a": old, "t": True})
        issue_bills(e, ra.clock, PERIOD)
        feed = RawFeed(ra.stub)
        ns = {n.account_no: n for n in feed.notices(2)}
        n = ns[old]
        feed.send([debited(x) for x in ns.values()])
        feed.until_cursor(2)
        feed.close()
        with e.connect() as conn:
            bills = {r.period: r for r in conn.execute(sa.select(T_BILLS).where(T_BILLS.c.account_no == old))}
            res = conn.execute(sa.select(T_RES.c.disposition).where(T_RES.c.bank_serial == f"AD-{n.seq}")).scalar_one()
        assert res == "POSTED"
        # The old bill (with its late fee) is settled first; the rest goes to the new bill.
        assert bills["202609"].status == "PAID"
        assert bills[PERIOD].principal_paid_fen < n.amount_fen
        # Posted as Pay posts (one payment, Pay's journal line, allocations adding up to the debit).
        from mis_adapter.db.core import AllocationRow
        t_alloc, t_journal = AllocationRow.__table__, JournalEntry.__table__
        with e.connect() as conn:
            pay = conn.execute(sa.select(T_PAY).where(T_PAY.c.bank_serial == f"AD-{n.seq}")).one()
            allocated = conn.execute(sa.select(sa.func.sum(t_alloc.c.late_fee_fen + t_alloc.c.principal_fen))
                                     .where(t_alloc.c.payment_id == pay.payment_id)).scalar_one()
            journal = conn.execute(sa.select(t_journal.c.rpc).where(t_journal.c.serial == f"AD-{n.seq}")).scalars().all()
        assert (pay.state, pay.channel, pay.amount_fen) == ("POSTED", "AUTO_DEBIT", n.amount_fen)
        assert allocated + pay.prepaid_added_fen == n.amount_fen and bills["202609"].late_fee_paid_fen > 0
        assert journal == ["PAY"]
        st = ra.stub.GetPayment(pb.GetPaymentRequest(bank_serial=f"AD-{n.seq}"), metadata=ra.md())
        assert st.state == pb.PAYMENT_STATE_POSTED and st.payment.account_no == old


@pytest.mark.timeout(120)
def test_bills_committed_out_of_order_are_all_delivered(topology: Topology) -> None:
    """A streams while issuer A holds its seqs uncommitted and issuer B queues
    behind it: after both commit, every bill arrives, gapless and in order.
    With branch databases both issuers run in branch 03's database, whose
    outbox the front merges."""
    import threading

    with _adapter(topology) as ra:
        code, e = _one_branch(ra)
        people = populate_period(e, 30, PERIOD, now=NOON, with_banks=False, branch=code)
        accts = [a for a, _ in people]
        first = accts[:10]
        issue_bills(e, ra.clock, PERIOD, accounts=first)
        feed = subscribe(ra.stub)
        assert [n.seq for n in feed.notices(10)] == list(range(1, 11))
        inside, release = threading.Event(), threading.Event()

        def hold(_batch: object) -> None:
            inside.set()
            assert release.wait(60)

        ta = threading.Thread(target=issue_bills, args=(e, ra.clock, PERIOD),
                              kwargs={"accounts": accts[10:20], "before_commit": hold})
        ta.start()
        assert inside.wait(60)
        tb = threading.Thread(target=issue_bills, args=(e, ra.clock, PERIOD),
                              kwargs={"accounts": accts[20:]})
        tb.start()
        if e.dialect.name == "postgresql":
            _wait_for_lock_waiter(e)
        with e.connect().execution_options(read_only=True) as conn:
            assert _count(ra, sa.select(sa.func.count()).select_from(T_RES)) == 0
            visible = conn.execute(sa.text("SELECT count(*) FROM feed_outbox")).scalar_one()
        assert visible == 10, "nothing of A or B is visible while A is open"
        release.set()
        ta.join(60)
        tb.join(60)
        rest = feed.notices(20)
        assert [n.seq for n in rest] == list(range(11, 31))
        assert {n.account_no for n in rest} == set(accts[10:])
        feed.close()


def _wait_for_lock_waiter(engine: sa.Engine) -> None:
    """B must really be blocked behind A's counter-row lock before A commits."""
    import threading

    q = sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
    for _ in range(600):
        with engine.connect() as conn:
            if conn.execute(q).scalar_one() > 0:
                return
        threading.Event().wait(0.05)
    raise AssertionError("issuer B never waited for A's lock")


@pytest.mark.timeout(30)
def test_answered_notice_redelivered_and_not_answered_again_does_not_stall(topology_lite: Topology) -> None:
    """Stream 1 gets answers for seqs 2 and 3 but not 1 (cursor stays 0). Stream 2
    redelivers 1..3; the bank answers only 1, which it had not answered: the
    cursor must reach 3 without the bank repeating its answers for 2 and 3."""
    with _adapter(topology_lite) as ra:
        _issue(ra, 3)
        first = subscribe(ra.stub)
        ns = first.notices(3)
        first.send([debited(ns[1]), debited(ns[2])])
        for _ in range(200):  # wait for the two answers to be stored
            if _count(ra, sa.select(sa.func.count()).select_from(T_RES)) == 2:
                break
            first.next_message()
        first.close()
        cursor = sa.select(sa.func.coalesce(sa.func.max(FeedCursor.__table__.c.acked_through_seq), 0))
        assert _count(ra, cursor) == 0
        second = subscribe(ra.stub)
        again = second.notices(3)
        assert [n.seq for n in again] == [1, 2, 3]
        second.send([debited(again[0])])
        second.until_cursor(3)
        second.close()
        assert _count(ra, cursor) == 3
        assert _count(ra, sa.select(sa.func.count()).select_from(T_PAY)) == 3
        assert _count(ra, sa.select(sa.func.sum(T_PAY.c.amount_fen))) == sum(n.amount_fen for n in ns)


@pytest.mark.timeout(120)
def test_a_debit_whose_serial_is_already_a_payment_is_that_payment_not_a_second_one(topology: Topology) -> None:
    """A debit's serial already posted (or posted and reversed) by Pay: the feed stores the result as that
    earlier payment (POSTED, or REVERSED) and writes no second payment; the other debits of the same message
    settle their bills. A serial taken by another account's payment refuses the message and writes nothing.
    (Posting first tries a batch without reading its serials; these reach the read through the unique key.)"""
    with _adapter(topology) as ra:
        _issue(ra, 9)
        code, e = _one_branch(ra)
        feed = RawFeed(ra.stub)
        all_ns = feed.notices(9)
        ns = [n for n in all_ns if n.account_no[:2] == code]
        assert len(ns) >= 3
        earlier, reversed_, conflicting = ns[0], ns[1], ns[2]
        for n in (earlier, reversed_):
            ra.stub.Pay(pb.PayRequest(bank_serial=f"AD-{n.seq}", account_no=n.account_no, amount_fen=n.amount_fen,
                                      outlet_code="O1", teller_id="T1", channel=pb.CHANNEL_COUNTER), metadata=ra.md())
        ra.stub.Cancel(pb.CancelRequest(cancel_serial=f"C-{reversed_.seq}", original_serial=f"AD-{reversed_.seq}",
                                        amount_fen=reversed_.amount_fen, reason="r"), metadata=ra.md())
        answered = [n for n in all_ns if n.seq != conflicting.seq]
        feed.send([debited(n) for n in answered])
        feed.until_cursor(conflicting.seq - 1)
        with e.connect() as conn:
            # by bill: with branch databases a result is stored under the branch's own seq
            res = dict(conn.execute(sa.select(T_RES.c.bill_id, T_RES.c.disposition)).all())
            pays = {r.bank_serial: r for r in conn.execute(sa.select(T_PAY))}
            bills = {r.bill_id: r for r in conn.execute(sa.select(T_BILLS))}
        assert res == {n.bill_id: {earlier.seq: "POSTED", reversed_.seq: "REVERSED"}.get(n.seq, "PAID")
                       for n in answered if n.account_no[:2] == code}
        assert len(pays) == len(res)  # no second payment of a known serial
        assert (pays[f"AD-{earlier.seq}"].channel, pays[f"AD-{earlier.seq}"].state) == ("COUNTER", "POSTED")
        assert (pays[f"AD-{reversed_.seq}"].channel, pays[f"AD-{reversed_.seq}"].state) == ("COUNTER", "REVERSED")
        assert all(pays[f"AD-{n.seq}"].channel == "AUTO_DEBIT" for n in answered
                   if n.account_no[:2] == code and n not in (earlier, reversed_))
        assert bills[earlier.bill_id].status == "PAID" and bills[reversed_.bill_id].status != "PAID"
        assert bills[earlier.bill_id].principal_paid_fen + bills[earlier.bill_id].prepaid_applied_fen \
            == bills[earlier.bill_id].amount_fen
        before = _count(ra, sa.select(sa.func.count()).select_from(T_PAY))
        # The last notice's debit carries the serial of another account's payment: refused, nothing written.
        feed.send([debited(conflicting, serial=f"AD-{earlier.seq}")])
        err = feed.error()
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        assert _count(ra, sa.select(sa.func.count()).select_from(T_PAY)) == before
