"""The link's other transactions over the wire of an in-process mis_adapter:
status codes of DESIGN.md (NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS,
INVALID_ARGUMENT naming the field, another bank's agreement as absent),
sign-off moving a counter pay to the next settlement day, sign-on restoring
it, the operator's suspension overriding sign-on, echo, refunds."""
from __future__ import annotations

import datetime as dt

import grpc
import pytest
import sqlalchemy as sa

from mis_adapter import link_state as ls
from mis_adapter import refunds as rf
from mis_adapter.banks import set_suspended
from mis_adapter.db.core import Customer
from mis_adapter.db.feed import RefundRow
from tests.support.mis_data import NOON, TODAY, BillSpec, add_account, row_counts, running_adapter
from tests.support.topology import Topology
from yindian.v1 import billing_pb2 as pb
from yindian_common.fields import make_account_no
from yindian_common.status import error_info

pytestmark = pytest.mark.migrated("mis")  # running_adapter needs the MIS schema

TOMORROW = (TODAY + dt.timedelta(days=1)).isoformat()


def _refused(call, *args, **kw) -> tuple[grpc.StatusCode, str, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=10, **kw)
    info = error_info(e.value)  # type: ignore[arg-type]
    return e.value.code(), info.reason if info else "", info.metadata.get("field", "") if info else ""  # type: ignore[attr-defined]


@pytest.mark.timeout(120)
def test_agreement_status_codes_over_the_wire(db_url_sqlite_pg: str) -> None:
    with running_adapter(db_url_sqlite_pg) as ra:
        acct = add_account(ra.engine, "01", 1)
        closed = add_account(ra.engine, "01", 2, status="CLOSED")
        s = ra.stub
        req = pb.SignAgreementRequest(agreement_serial="AG-1", account_no=acct, savings_account_ref="SAV-1",
                                      debit_limit_fen=90_000)
        first = s.SignAgreement(req, timeout=10, metadata=ra.md("ICBC"))
        assert (first.replayed, first.agreement.state, first.agreement.start_date, first.agreement.debit_limit_fen) \
            == (False, pb.AGREEMENT_STATE_ACTIVE, TODAY.isoformat(), 90_000)
        before = row_counts([ra.engine])
        assert s.SignAgreement(req, timeout=10, metadata=ra.md("ICBC")).replayed
        changed = pb.SignAgreementRequest(agreement_serial="AG-1", account_no=acct, savings_account_ref="SAV-2")
        assert _refused(s.SignAgreement, changed, metadata=ra.md("ICBC"))[:2] == \
            (grpc.StatusCode.ALREADY_EXISTS, "SERIAL_REUSED")
        unknown = pb.SignAgreementRequest(agreement_serial="AG-2", account_no=make_account_no("01", 9_999_999),
                                          savings_account_ref="SAV-1")
        assert _refused(s.SignAgreement, unknown, metadata=ra.md("ICBC"))[0] == grpc.StatusCode.NOT_FOUND
        shut = pb.SignAgreementRequest(agreement_serial="AG-3", account_no=closed, savings_account_ref="SAV-1")
        assert _refused(s.SignAgreement, shut, metadata=ra.md("ICBC"))[:2] == \
            (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_CLOSED")
        taken = pb.SignAgreementRequest(agreement_serial="AG-4", account_no=acct, savings_account_ref="SAV-1")
        assert _refused(s.SignAgreement, taken, metadata=ra.md("ABC"))[:2] == \
            (grpc.StatusCode.FAILED_PRECONDITION, "AGREEMENT_ACTIVE")
        for bad, field in ((pb.SignAgreementRequest(agreement_serial="AG 5", account_no=acct,
                                                    savings_account_ref="S"), "agreement_serial"),
                           (pb.SignAgreementRequest(agreement_serial="AG-5", account_no=acct,
                                                    savings_account_ref="S", start_date="2026-13-01"), "start_date"),
                           (pb.SignAgreementRequest(agreement_serial="AG-5", account_no=acct,
                                                    savings_account_ref="S", debit_limit_fen=-1), "debit_limit_fen")):
            assert _refused(s.SignAgreement, bad, metadata=ra.md("ICBC")) == \
                (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", field)
        assert row_counts([ra.engine]) == before
        # Another bank neither sees nor ends it, exactly as for an account with no agreement.
        other = s.ListAgreements(pb.ListAgreementsRequest(account_no=acct), timeout=10, metadata=ra.md("ABC"))
        assert list(other.agreements) == []
        end_other = _refused(s.EndAgreement, pb.EndAgreementRequest(end_serial="E-1", account_no=acct),
                             metadata=ra.md("ABC"))
        end_none = _refused(s.EndAgreement, pb.EndAgreementRequest(end_serial="E-1", account_no=closed),
                            metadata=ra.md("ABC"))
        assert end_other == end_none == (grpc.StatusCode.NOT_FOUND, "AGREEMENT_NOT_FOUND", "")
        ended = s.EndAgreement(pb.EndAgreementRequest(end_serial="E-1", account_no=acct), timeout=10,
                               metadata=ra.md("ICBC"))
        assert (ended.replayed, ended.agreement.state, ended.agreement.end_date) == \
            (False, pb.AGREEMENT_STATE_ENDED, TODAY.isoformat())
        assert s.EndAgreement(pb.EndAgreementRequest(end_serial="E-1", account_no=acct), timeout=10,
                              metadata=ra.md("ICBC")).replayed
        mine = s.ListAgreements(pb.ListAgreementsRequest(), timeout=10, metadata=ra.md("ICBC"))
        assert [(a.account_no, a.state) for a in mine.agreements] == [(acct, pb.AGREEMENT_STATE_ENDED)]
        assert _refused(s.ListAgreements, pb.ListAgreementsRequest(page_size=501), metadata=ra.md("ICBC"))[2] == \
            "page_size"


def _pay(ra, serial: str, acct: str, timeout: float = 10):  # type: ignore[no-untyped-def]
    return ra.stub.Pay(pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=1_000, outlet_code="O1",
                                     teller_id="T1", channel=pb.CHANNEL_COUNTER), timeout=timeout,
                       metadata=ra.md("ICBC"))


@pytest.mark.timeout(120)
def test_sign_off_on_suspension_and_echo(topology: Topology) -> None:
    """Also with branch databases (the pay's settlement date is what reconciliation matches on): the
    account then lives in branch 03's own database, and the link is signed on and off at the front."""
    with running_adapter(topology.db, branch_db=topology.branch_db) as ra:
        code = topology.codes[-1]
        acct = add_account(ra.ctx.router.engine_for_branch(code), code, 1,
                           [BillSpec("202610", 50_000, dt.date(2026, 11, 25))])
        s = ra.stub
        echo = s.Echo(pb.EchoRequest(nonce="n-1"), timeout=10, metadata=ra.md("ICBC"))
        assert (echo.nonce, echo.link.state, echo.link.settlement_date) == \
            ("n-1", pb.LINK_STATE_OPEN, TODAY.isoformat())
        assert _refused(s.Echo, pb.EchoRequest(nonce="x" * 33), metadata=ra.md("ICBC"))[2] == "nonce"
        on = s.SignOn(pb.SignOnRequest(), timeout=10, metadata=ra.md("ICBC")).link
        assert (on.state, on.business_date, on.suspended) == (pb.LINK_STATE_SIGNED_ON, TODAY.isoformat(), False)
        assert _pay(ra, "P-1", acct).settlement_date == TODAY.isoformat()
        off = s.SignOff(pb.SignOffRequest(), timeout=10, metadata=ra.md("ICBC")).link
        assert (off.state, off.settlement_date) == (pb.LINK_STATE_SIGNED_OFF, TOMORROW)
        # After sign-off a counter pay is accepted and settles on the next day (DESIGN: 日终签退).
        assert _pay(ra, "P-2", acct).settlement_date == TOMORROW
        assert s.Echo(pb.EchoRequest(), timeout=10, metadata=ra.md("ABC")).link.settlement_date == TODAY.isoformat()
        assert s.SignOn(pb.SignOnRequest(), timeout=10, metadata=ra.md("ICBC")).link.settlement_date == \
            TODAY.isoformat()
        assert _pay(ra, "P-3", acct).settlement_date == TODAY.isoformat()
        # The operator's suspension overrides sign-on: pays refused; a sign-on is recorded and says so.
        set_suspended(ra.engine, "ICBC", True, "maintenance", NOON)
        assert _refused(_pay, ra, "P-4", acct)[:2] == (grpc.StatusCode.UNAVAILABLE, "BANK_SUSPENDED")
        again = s.SignOn(pb.SignOnRequest(), timeout=10, metadata=ra.md("ICBC")).link
        assert (again.state, again.suspended) == (pb.LINK_STATE_SIGNED_ON, True)
        assert _refused(_pay, ra, "P-4", acct)[:2] == (grpc.StatusCode.UNAVAILABLE, "BANK_SUSPENDED")
        set_suspended(ra.engine, "ICBC", False, "", NOON)
        assert _pay(ra, "P-4", acct).settlement_date == TODAY.isoformat()
        assert _refused(s.SignOn, pb.SignOnRequest(), metadata=ra.md("NOPE"))[0] == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.timeout(120)
def test_refunds_over_the_wire(db_url_sqlite_pg: str) -> None:
    with running_adapter(db_url_sqlite_pg) as ra:
        acct = add_account(ra.engine, "01", 1)
        ls.set_refund_mode(ra.engine, "ICBC", ls.REFUND, TODAY, NOON)
        with ra.engine.begin() as conn:
            conn.execute(sa.update(Customer.__table__).values(prepaid_fen=4_000))
            conn.execute(sa.insert(RefundRow.__table__).values(
                bank_id="ICBC", seq=7, bill_id=1, account_no=acct, bank_serial="AD-7", amount_fen=4_000,
                payment_id=None, listed_at=NOON))
            rf.offer_in_tx(conn, "ICBC", [7], NOON)
        s = ra.stub
        (notice,) = s.ListRefunds(pb.ListRefundsRequest(), timeout=10, metadata=ra.md("ICBC")).refunds
        assert (notice.account_no, notice.amount_fen, notice.original_serial) == (acct, 4_000, "AD-7")
        assert list(s.ListRefunds(pb.ListRefundsRequest(), timeout=10, metadata=ra.md("ABC")).refunds) == []
        ack = pb.AcknowledgeRefundsRequest(acks=[pb.RefundAck(refund_id=notice.refund_id, credit_serial="CR-1",
                                                             amount_fen=4_000)])
        assert _refused(s.AcknowledgeRefunds, ack, metadata=ra.md("ABC"))[:3] == \
            (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "acks[0].refund_id")
        r = s.AcknowledgeRefunds(ack, timeout=10, metadata=ra.md("ICBC"))
        assert (r.acknowledged, r.replayed, r.settlement_date) == (1, 0, TODAY.isoformat())
        again = s.AcknowledgeRefunds(ack, timeout=10, metadata=ra.md("ICBC"))
        assert (again.acknowledged, again.replayed) == (0, 1)
        assert list(s.ListRefunds(pb.ListRefundsRequest(), timeout=10, metadata=ra.md("ICBC")).refunds) == []


@pytest.mark.timeout(120)
def test_ended_agreement_notice_is_withdrawn_and_answered_not_debited(topology: Topology) -> None:
    """Also with branch databases: the ended agreement's account in branch 02's database, the kept one in 03's."""
    from mis_adapter.db.core import BillRow
    from mis_adapter.db.feed import DebitResultRow
    from mis_adapter.issue_bills import issue_bills
    from tests.mis_adapter.test_agreements import _reading
    from tests.mis_adapter.test_feed_support import debited, subscribe

    with running_adapter(topology.db, branch_db=topology.branch_db, feed_heartbeat_s=0.2, feed_lease_ttl_s=5.0,
                         feed_poll_interval_s=0.05) as ra:
        codes = topology.codes[-2:] if topology.split else ("01", "01")
        engines = [ra.ctx.router.engine_for_branch(c) for c in codes]
        ended, kept = add_account(engines[0], codes[0], 1), add_account(engines[1], codes[1], 2)
        for i, (a, e) in enumerate(zip((ended, kept), engines, strict=True)):
            ra.stub.SignAgreement(pb.SignAgreementRequest(agreement_serial=f"AG-{i}", account_no=a,
                                                          savings_account_ref="S"), timeout=10, metadata=ra.md())
            _reading(e, a, "202611", 200)
        for e in ra.ctx.router.engines():
            issue_bills(e, ra.clock, "202611")
        r = ra.stub.EndAgreement(pb.EndAgreementRequest(end_serial="E-0", account_no=ended), timeout=10,
                                 metadata=ra.md())
        assert r.withdrawn_notices == 1
        feed = subscribe(ra.stub)
        by_acct = {n.account_no: n for n in feed.notices(2)}
        assert (by_acct[ended].withdrawn, by_acct[kept].withdrawn) == (True, False)
        # NOT_DEBITED answers only a withdrawn notice: the whole batch is refused.
        feed.send([pb.DebitResult(seq=by_acct[kept].seq, outcome=pb.DEBIT_OUTCOME_NOT_DEBITED)])
        err = feed.error()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(err).metadata["field"] == "results[0].outcome"  # type: ignore[union-attr]
        feed.close()
        feed = subscribe(ra.stub)
        again = {n.account_no: n for n in feed.notices(2)}
        assert again[ended].withdrawn
        feed.send([pb.DebitResult(seq=again[ended].seq, outcome=pb.DEBIT_OUTCOME_NOT_DEBITED),
                   debited(again[kept])])
        feed.until_cursor(2)
        feed.close()
        disp, bills = {}, {}
        for e in ra.ctx.router.engines():
            with e.connect() as conn:
                disp.update(conn.execute(sa.select(DebitResultRow.__table__.c.account_no,
                                                   DebitResultRow.__table__.c.disposition)).all())
                bills.update({r.account_no: (r.status, r.dunning) for r in conn.execute(sa.select(BillRow.__table__))})
        assert disp == {ended: "WITHDRAWN", kept: "PAID"}
        assert bills == {ended: ("UNPAID", False), kept: ("PAID", False)}
