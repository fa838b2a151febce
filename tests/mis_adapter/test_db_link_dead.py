"""A pay whose database link dies while the server commits it, seen from the wire and from the
database (yindian_common.db's dead-link bound): mis_adapter's PostgreSQL connections cross a real
link (tests.support.netns_link); the pay waits on its account's row lock, the link goes dark,
the lock is let go and the server commits the pay, whose answer is lost. The bank hears
COMMIT_IN_DOUBT within the bound while the link is still dark, not DEADLINE_EXCEEDED after its
whole deadline (a money thread held all along); once the link heals, asking about the serial
finds the payment POSTED, paying it again returns that payment, and the database holds it once.
With a deadline shorter than that bound, the pay gives up at its deadline (pay_pg's client-side
wait), not at the bound: its money thread is free again while the link is still dark."""
from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine

from mis_adapter.db.core import BillRow, Customer, Payment
from tests.support.databases import fresh_database
from tests.support.mis_data import NOON, BillSpec, RunningAdapter, add_account, running_adapter
from tests.support.netns_link import NetnsLink, database_link
from tests.support.waiting import wait_until
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import customer_pb2, customer_pb2_grpc, report_pb2, report_pb2_grpc
from yindian_common import db_watch
from yindian_common.db import DB_LINK_DEAD_S, make_engine
from yindian_common.status import error_info

pytestmark = [pytest.mark.migrated("mis"), pytest.mark.timeout(180)]

BILLS = [BillSpec("202610", 15_000, dt.date(2026, 11, 25))]
PAY_DEADLINE_S = 60.0  # longer than the bound by far: the answer must come from the bound
SLACK_S = 10.0


def pay_req(serial: str, acct: str, amount: int) -> pb.PayRequest:
    return pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=amount, outlet_code="OUT1",
                         teller_id="T01", channel=pb.CHANNEL_COUNTER)


def handled(method: str = "Pay") -> float:
    """Calls of `method` mis_adapter has finished handling, whatever their status (grpc_server_handled_total)."""
    return sum(s.value for m in REGISTRY.collect() for s in m.samples
               if s.name == "grpc_server_handled_total" and s.labels.get("grpc_method") == method)


@contextmanager
def adapter_across_a_link(tmp_path: Path, **settings: object
                          ) -> Iterator[tuple[RunningAdapter, NetnsLink, Engine, str]]:
    """mis_adapter (with `settings`) on a fresh PostgreSQL database reached across a link that can go dark;
    a direct engine to the same database (not across the link) and an account with BILLS."""
    with fresh_database("postgresql", tmp_path, schema="mis") as url:
        direct = make_engine(url, pool_size=2)
        try:
            with database_link(url) as (link, far_url):
                acct = add_account(direct, "01", 1, BILLS)
                with running_adapter(far_url, **settings) as a:
                    yield a, link, direct, acct
        finally:
            direct.dispose()


def a_pay_committed_as_its_link_dies(tmp_path: Path, deadline_s: float,
                                     while_dark: Callable[[grpc.Future, float, float], None]) -> None:
    """The scene: a pay waits on its account's row lock, its link goes dark, the lock is let go and the
    server commits the pay (its answer lost). `while_dark(call, sent_at, before)` checks what the bank
    sees while the link is still dark (`before`: handled() when the pay was sent); then the link heals,
    the doubt resolves to POSTED, paying again returns that payment, and the database holds it once."""
    with adapter_across_a_link(tmp_path) as (a, link, direct, acct):
        a.stub.Pay(pay_req("WARM", acct, 100), metadata=a.md(), timeout=10)  # a kept connection
        holder = direct.connect()
        tx = holder.begin()
        holder.execute(sa.select(Customer.__table__.c.account_no)
                       .where(Customer.__table__.c.account_no == acct).with_for_update())
        before, sent_at = handled(), time.monotonic()
        call = a.stub.Pay.future(pay_req("P-DARK", acct, 5_000), metadata=a.md(), timeout=deadline_s)

        def pay_waits_on_the_lock() -> bool:
            with direct.connect() as conn:
                return conn.execute(sa.text(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'")).scalar_one() == 1

        wait_until(pay_waits_on_the_lock, "the pay waiting on its account's row lock")
        link.blackhole()
        tx.rollback()
        holder.close()

        def paid_on_the_server() -> bool:
            with direct.connect() as conn:
                return conn.execute(sa.select(sa.func.count()).select_from(Payment.__table__)
                                    .where(Payment.__table__.c.bank_serial == "P-DARK")).scalar_one() == 1

        wait_until(paid_on_the_server, "the pay committed on the server")
        while_dark(call, sent_at, before)

        link.heal()

        def state() -> int:
            try:
                return int(a.stub.GetPayment(pb.GetPaymentRequest(bank_serial="P-DARK"),
                                             metadata=a.md(), timeout=10).state)
            except grpc.RpcError as e:  # the first call on a pooled connection the link killed
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return -1

        wait_until(lambda: state() == pb.PAYMENT_STATE_POSTED, "the doubt resolved: POSTED")
        again = a.stub.Pay(pay_req("P-DARK", acct, 5_000), metadata=a.md(), timeout=10)
        assert again.amount_fen == 5_000
        with direct.connect() as conn:
            p, b = Payment.__table__, BillRow.__table__
            assert conn.execute(sa.select(sa.func.count(), sa.func.sum(p.c.amount_fen))
                                .where(p.c.account_no == acct)).one() == (2, 5_100)
            assert conn.execute(sa.select(b.c.principal_paid_fen + b.c.late_fee_paid_fen)
                                .where(b.c.account_no == acct)).scalar_one() == 5_100


def test_a_pay_committed_as_its_link_dies_is_in_doubt_within_the_bound_and_found_once_after(
        tmp_path: Path) -> None:
    def within_the_bound(call: grpc.Future, _sent_at: float, _handled: float) -> None:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            call.result(timeout=DB_LINK_DEAD_S + SLACK_S)
        answered_s = time.monotonic() - t0
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE, (exc.value.code(), answered_s)
        assert error_info(exc.value).reason == "COMMIT_IN_DOUBT"

    a_pay_committed_as_its_link_dies(tmp_path, PAY_DEADLINE_S, within_the_bound)


def test_a_pay_whose_deadline_comes_before_the_link_bound_lets_go_at_its_deadline(tmp_path: Path) -> None:
    """A 4 s deadline, shorter than the dead-link bound: mis_adapter answers the pay (in doubt) by its
    deadline and is done with it (its handled count moves) while the link is still dark, instead of
    holding its money thread and kept connection until TCP gives up on the link."""
    deadline_s = 4.0
    assert deadline_s + 1.0 < DB_LINK_DEAD_S

    def at_the_deadline(call: grpc.Future, sent_at: float, before: float) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            call.result(timeout=deadline_s + SLACK_S)
        # The in-doubt answer leaves 50 ms before the deadline (db.ANSWER_SLACK_S); a busy box may deliver
        # it late, and the bank then sees its own deadline pass: in doubt either way.
        if exc.value.code() == grpc.StatusCode.UNAVAILABLE:
            assert error_info(exc.value).reason == "COMMIT_IN_DOUBT"
        else:
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc.value.code()
        left_s = sent_at + deadline_s + 1.0 - time.monotonic()
        assert left_s > 0, "the scene took longer than the pay's deadline and a second"
        wait_until(lambda: handled() == before + 1, "mis_adapter done with the pay", timeout_s=left_s)

    a_pay_committed_as_its_link_dies(tmp_path, deadline_s, at_the_deadline)


@pytest.mark.parametrize("case", ["QueryAccount", "GetPayment", "CollectionSummary", "CollectionDetail",
                                  "Reconcile", "Reconcile:bank-known"])
def test_a_read_on_a_dark_link_lets_go_at_its_deadline(tmp_path: Path, case: str) -> None:
    """QueryAccount, GetPayment, the reports (a unary one, a detail stream) and a Reconcile stream (of a day
    reconciled once already: the bank's status is read, or with it known, the day's stored result) on a link
    gone dark: mis_adapter is done with the call (its handled count moves) by its deadline and a second, the
    link still dark, and the bank hears UNAVAILABLE or its own deadline; before, the read's thread was held
    until TCP gave up on the link (DB_LINK_DEAD_S). Once the link heals, the same read answers."""
    method, _, variant = case.partition(":")
    deadline_s = 3.0
    assert deadline_s + 1.0 < DB_LINK_DEAD_S
    settings = {"bank_status_ttl_s": 3_600.0} if variant == "bank-known" else {}
    with adapter_across_a_link(tmp_path, **settings) as (a, link, _direct, acct):
        reports = report_pb2_grpc.ReportServiceStub(a.channel)
        days = {"from_date": "2026-11-01", "to_date": "2026-11-02"}

        def read(timeout_s: float) -> Callable[[], object]:
            """Sends the call; the function returned waits for its whole answer."""
            kw = {"metadata": a.md(), "timeout": timeout_s}
            if method == "Reconcile":
                day = pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=NOON.date().isoformat()))
                recon = a.stub.Reconcile(iter([day]), **kw)
                return lambda: list(recon)
            if method == "CollectionDetail":
                stream = reports.CollectionDetail(report_pb2.CollectionDetailRequest(**days), **kw)
                return lambda: list(stream)
            if method == "CollectionSummary":
                req = report_pb2.CollectionSummaryRequest(**days, group_by=report_pb2.GROUP_BY_BANK)
                return reports.CollectionSummary.future(req, **kw).result
            if method == "QueryAccount":
                return a.stub.QueryAccount.future(pb.QueryAccountRequest(account_no=acct), **kw).result
            return a.stub.GetPayment.future(pb.GetPaymentRequest(bank_serial="NONE-SUCH"), **kw).result

        read(10)()  # a pooled connection across the link
        link.blackhole()
        before, cuts, sent_at = handled(method), db_watch.overdue_cuts(), time.monotonic()
        answer = read(deadline_s)
        with pytest.raises(grpc.RpcError) as exc:
            answer()
        assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        left_s = sent_at + deadline_s + 1.0 - time.monotonic()
        assert left_s > 0, "the bank's call outlived its deadline and a second"
        wait_until(lambda: handled(method) == before + 1, f"mis_adapter done with {method}", timeout_s=left_s)
        # A stream is counted handled when its call ends, even with its thread still waiting on the link:
        # the round trip itself was given up (db_watch cut its socket) by the deadline and a second.
        left_s = sent_at + deadline_s + 1.0 - time.monotonic()
        wait_until(lambda: db_watch.overdue_cuts() > cuts, f"{method}'s round trip cut", timeout_s=max(left_s, 0.01))
        link.heal()

        def answers() -> bool:
            try:
                read(10)()
                return True
            except grpc.RpcError as e:  # the first call on a pooled connection the link killed
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return False

        wait_until(answers, f"{method} answering again")


def test_the_link_control_and_operator_calls_on_a_dark_link_let_go_at_their_deadline(tmp_path: Path) -> None:
    """The link's transactions (SignOn, SignAgreement), the control-totals exchange and an operator's
    CustomerService read, sent together on a link gone dark: mis_adapter is done with each (its handled
    count moves) by its deadline and a second, each round trip given up (db_watch cut its socket), the link
    still dark; before, each held its thread until TCP gave up on the link (DB_LINK_DEAD_S). Once the link
    heals, the operator reads the account's arrears and the bank signs on."""
    deadline_s = 3.0
    assert deadline_s + 1.0 < DB_LINK_DEAD_S
    with adapter_across_a_link(tmp_path, operators=["portal"]) as (a, link, _direct, acct):
        customers = customer_pb2_grpc.CustomerServiceStub(a.channel)
        operator = [("x-yindian-operator", "portal")]
        overview = customer_pb2.GetAccountOverviewRequest(account_no=acct, phone_last4="5678")
        totals = pb.ExchangeControlTotalsRequest(settlement_date="2026-11-01")
        totals.posted_before.FromDatetime(dt.datetime(2026, 11, 2))
        sign = pb.SignAgreementRequest(agreement_serial="AG-DARK-1", account_no=acct, savings_account_ref="SAV-1")
        calls: dict[str, Callable[[float], grpc.Future]] = {
            "SignOn": lambda t: a.stub.SignOn.future(pb.SignOnRequest(), metadata=a.md(), timeout=t),
            "SignAgreement": lambda t: a.stub.SignAgreement.future(sign, metadata=a.md(), timeout=t),
            "ExchangeControlTotals": lambda t: a.stub.ExchangeControlTotals.future(totals, metadata=a.md(),
                                                                                   timeout=t),
            "GetAccountOverview": lambda t: customers.GetAccountOverview.future(overview, metadata=operator,
                                                                                timeout=t),
        }
        held = [a.engine.connect() for _ in calls]  # one pooled connection across the link for each call
        for conn in held:
            conn.close()
        link.blackhole()
        before = {m: handled(m) for m in calls}
        cuts, sent_at = db_watch.overdue_cuts(), time.monotonic()
        futures = {m: call(deadline_s) for m, call in calls.items()}
        for m, future in futures.items():
            exc = future.exception()
            assert isinstance(exc, grpc.RpcError), f"{m} answered on a dark link"
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), (m, exc)
        let_go_by = sent_at + deadline_s + 1.0
        assert time.monotonic() < let_go_by, "the calls outlived their deadline and a second"

        def still_held() -> list[str]:
            return [m for m in calls if handled(m) != before[m] + 1]

        wait_until(lambda: not still_held() or time.monotonic() >= let_go_by, "the deadline and a second")
        assert still_held() == [], "held past their deadline and a second on a dark link"
        assert db_watch.overdue_cuts() >= cuts + len(calls)
        link.heal()

        def overview_answers() -> int | None:
            try:
                return int(customers.GetAccountOverview(overview, metadata=operator, timeout=10).arrears_fen)
            except grpc.RpcError as e:  # the first call on a pooled connection the link killed
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return None

        wait_until(lambda: overview_answers() is not None, "the operator's read answering again")
        assert overview_answers() == sum(b.amount_fen for b in BILLS)
        assert a.stub.SignOn(pb.SignOnRequest(), metadata=a.md(), timeout=10).link.state == pb.LINK_STATE_SIGNED_ON


def test_a_detail_stream_outlasting_the_database_wait_bound_is_not_cut_before_its_deadline(tmp_path: Path) -> None:
    """A CollectionDetail stream read by a bank slower than db_wait_max_s (1 s here), with a deadline far
    beyond: every payment arrives. The watch cuts a call's round trips at its deadline, not at the
    longest single database wait from its start: before, the stream's connection (checked out once for
    all its pages) was cut db_wait_max_s after the stream began, and the bank heard UNAVAILABLE midway."""
    payments, bank_pause_s = 60_000, 2.5
    with adapter_across_a_link(tmp_path, db_wait_max_s=1.0) as (a, _link, direct, acct):
        with direct.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO payments (bank_id, bank_serial, state, account_no, branch_code, amount_fen, channel, "
                "outlet_code, teller_id, settlement_date, posted_at, arrears_after_fen, prepaid_after_fen, "
                "prepaid_added_fen) SELECT 'ICBC', 'S' || n, 'POSTED', :acct, '01', 100, 'COUNTER', 'OUT1', 'T01', "
                "DATE '2026-11-01', TIMESTAMPTZ '2026-11-01 02:00:00+00', 0, 0, 0 "
                "FROM generate_series(1, :n) AS n"), {"acct": acct, "n": payments})
        reports = report_pb2_grpc.ReportServiceStub(a.channel)
        cuts = db_watch.overdue_cuts()
        stream = reports.CollectionDetail(report_pb2.CollectionDetailRequest(from_date="2026-11-01",
                                                                             to_date="2026-11-01"),
                                          metadata=a.md(), timeout=60)
        first = next(stream)
        # The bank reads slowly: the stream, held back by flow control, outlasts db_wait_max_s.
        time.sleep(bank_pause_s)
        got = len(first.payments) + sum(len(page.payments) for page in stream)
        assert got == payments
        assert db_watch.overdue_cuts() == cuts
