"""The bridge's own database (its journal) refusing connections, seen from the bank core: a retried pay and
the journaled link transactions answer UNAVAILABLE naming the bridge's journal database, forward nothing,
and answer again once it is back. Before, the driver's error escaped the handler: the bank heard UNKNOWN
with psycopg's text, and a retried pay whose journal read failed kept its serial claimed, so every later
retry of it waited and was refused as still in flight until the bridge restarted. Its link gone dark, a
journaled link transaction is given up by the caller's deadline, not after the dead-link bound."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from bridge.link_journal import SIGN_OFF
from bridge.link_relay import relay_of
from tests.bridge.conftest import BankCore, Utility, new_serial, pay_request
from tests.support.databases import fresh_database
from tests.support.netns_link import database_link
from tests.support.waiting import wait_until
from yindian.v1 import billing_pb2 as pb
from yindian_common import db_watch
from yindian_common.db import DB_CONNECT_TIMEOUT_S, DB_LINK_DEAD_S, make_engine
from yindian_common.status import error_info

pytestmark = pytest.mark.timeout(120)


@contextmanager
def journal_refusing(url: str) -> Iterator[None]:
    """The bridge's database takes no new connection, and the serving pool's are ended (the journal
    writer's own connection lives on, so a retried pay's row is found journaled)."""
    base, name = url.rsplit("/", 1)
    admin = make_engine(f"{base}/postgres", pool_size=1)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = :d AND application_name = 'bridge'"), {"d": name})
            conn.commit()
        try:
            yield
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
                conn.commit()
    finally:
        admin.dispose()


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value


def test_a_journal_that_refuses_connections_is_answered_unavailable_and_lets_the_serial_go(
        tmp_path: Path, utility: Utility, make_bridge: Callable[..., BankCore]) -> None:
    with fresh_database("postgresql", tmp_path, schema="bridge") as url:
        core = make_bridge(utility.address, db=url)
        acct = next(utility.accounts)
        req = pay_request(new_serial("JDOWN"), acct, 1_00)
        paid = core.stub.Pay(req, timeout=10)
        journal = relay_of(core.bridge.ctx).journal
        state = core.stub.Echo(pb.EchoRequest(nonce="n-0"), timeout=10).link.state
        assert state != pb.LINK_STATE_SIGNED_OFF
        with journal_refusing(url):
            again = refused(lambda: core.stub.Pay(req, timeout=10))
            assert again.code() == grpc.StatusCode.UNAVAILABLE, again.details()
            assert "bridge journal database" in (again.details() or "")
            off = refused(lambda: core.stub.SignOff(pb.SignOffRequest(), timeout=10))
            assert off.code() == grpc.StatusCode.UNAVAILABLE, off.details()
            info = error_info(off)
            assert info is not None and info.reason == "DB_UNAVAILABLE"
            # Nothing was forwarded: the utility's link state is as it was.
            assert core.stub.Echo(pb.EchoRequest(nonce="n-1"), timeout=10).link.state == state
        # The journal back: the same pay answers its payment at once (its serial is not held), once.
        assert core.stub.Pay(req, timeout=10) == paid
        assert utility.payment(req.bank_serial)["amount_fen"] == 1_00
        assert journal.lines_of(SIGN_OFF, "") == []
        off_link = core.stub.SignOff(pb.SignOffRequest(), timeout=10).link
        assert off_link.state == pb.LINK_STATE_SIGNED_OFF
        assert core.stub.SignOn(pb.SignOnRequest(), timeout=10).link.state == pb.LINK_STATE_SIGNED_ON


def test_a_journaled_link_call_on_a_dark_journal_link_lets_go_by_its_deadline(
        tmp_path: Path, utility: Utility, make_bridge: Callable[..., BankCore]) -> None:
    """The bridge's journal reached across a link that goes dark: a SignOff with a 3 s deadline is answered
    UNAVAILABLE naming the journal database before that deadline, its journal write given up (db_watch cut
    the round trip) and nothing forwarded. Before, the write held the serving thread until TCP gave the link
    up (DB_LINK_DEAD_S) and the bank heard only its own DEADLINE_EXCEEDED. The link healed, SignOff works."""
    deadline_s = 3.0
    assert deadline_s + 1.0 < DB_LINK_DEAD_S
    with fresh_database("postgresql", tmp_path, schema="bridge") as url, database_link(url) as (link, far_url):
        core = make_bridge(utility.address, db=far_url)
        state = core.stub.SignOn(pb.SignOnRequest(), timeout=10).link.state  # a pooled connection across the link
        link.blackhole()
        cuts, sent_at = db_watch.overdue_cuts(), time.monotonic()
        off = refused(lambda: core.stub.SignOff(pb.SignOffRequest(), timeout=deadline_s))
        assert off.code() == grpc.StatusCode.UNAVAILABLE, (off.code(), off.details())
        assert "bridge journal database" in (off.details() or "")
        assert time.monotonic() - sent_at < deadline_s
        assert db_watch.overdue_cuts() > cuts
        # Nothing was forwarded: the utility's link state is as it was (Echo journals nothing).
        assert core.stub.Echo(pb.EchoRequest(nonce="n-dark"), timeout=10).link.state == state
        link.heal()

        def signed_off() -> bool:
            try:
                return core.stub.SignOff(pb.SignOffRequest(), timeout=10).link.state == pb.LINK_STATE_SIGNED_OFF
            except grpc.RpcError as e:  # the first call on a pooled connection the link killed
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return False

        wait_until(signed_off, "SignOff answering again")


@pytest.mark.parametrize(("pooled", "bank"), [(True, "BOC"), (False, "CCB")],
                         ids=["pooled-connection", "new-connection"])
def test_a_reconciliation_on_a_dark_journal_link_lets_go_by_its_deadline(
        tmp_path: Path, utility: Utility, make_bridge: Callable[..., BankCore], pooled: bool, bank: str) -> None:
    """A Reconcile stream sent with a 3 s deadline while the bridge's journal link is dark: the bridge's look
    for the day's in-doubt payments is given up by that deadline, the bank hears UNAVAILABLE naming the journal
    database, and nothing reaches the utility (the day stays open there). On a pooled connection db_watch cuts
    the round trip; a connection opened for it (none pooled) gives up its attempt in time (its connect_timeout
    cut to what the call has left). Before, either held the stream's thread until the link bound
    (DB_LINK_DEAD_S, or DB_CONNECT_TIMEOUT_S for the attempt), and the bank heard only its own
    DEADLINE_EXCEEDED. The link healed, the same day reconciles: the payment matched. (A bank of its own per
    case: the utility is the module's, and a bank's reconciled day takes its later pays to the next day.)"""
    deadline_s = 3.0
    assert deadline_s + 1.0 < DB_CONNECT_TIMEOUT_S < DB_LINK_DEAD_S
    with fresh_database("postgresql", tmp_path, schema="bridge") as url, database_link(url) as (link, far_url):
        core = make_bridge(utility.address, db=far_url, bank_id=bank)
        serial, account = new_serial("RDK"), next(utility.accounts)
        day = core.pay(serial, account, 1_000).settlement_date
        if pooled:
            core.stub.SignOn(pb.SignOnRequest(), timeout=10)  # leaves a pooled connection across the link
        day_stream = [pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=day)),
                      pb.ReconcileRequest(batch=pb.BankRecordBatch(records=[pb.BankRecord(
                          bank_serial=serial, account_no=account, amount_fen=1_000,
                          status=pb.BANK_RECORD_STATUS_POSTED)]))]
        link.blackhole()
        cuts, sent_at = db_watch.overdue_cuts(), time.monotonic()
        dark = refused(lambda: list(core.stub.Reconcile(iter(day_stream), timeout=deadline_s)))
        assert dark.code() == grpc.StatusCode.UNAVAILABLE, (dark.code(), dark.details())
        assert "bridge journal database" in (dark.details() or "")
        assert time.monotonic() - sent_at < deadline_s
        assert db_watch.overdue_cuts() > cuts if pooled else db_watch.overdue_cuts() == cuts
        link.heal()
        answers: list[pb.ReconcileSummary] = []

        def reconciled() -> bool:
            try:
                answers.append(list(core.stub.Reconcile(iter(day_stream), timeout=30))[-1].summary)
                return True
            except grpc.RpcError as e:  # the first call on a pooled connection the link killed
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return False

        wait_until(reconciled, "Reconcile answering again")
        assert not answers[0].replayed, "the stream on the dark link reached the utility and closed the day"
        assert {t.outcome: (t.count, t.amount_fen) for t in answers[0].totals if t.count} == {
            pb.RECONCILE_OUTCOME_MATCHED: (1, 1_000)}
