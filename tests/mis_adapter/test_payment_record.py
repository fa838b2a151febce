"""Issue 9 item 11: what the bank reports with a counter payment (its time,
outlet, teller and the payer's savings balance after the debit) is stored
exactly and shown where an operator looks: the payment's status
(GetPayment) and the collection detail report (ReportService and the
`report collections-detail` command), on every back end."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import grpc
import pytest

from tests.support.mis_data import SHANGHAI, BillSpec, add_account, running_adapter
from tests.support.procs import REPO
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import report_pb2 as rpb
from yindian.v1 import report_pb2_grpc

pytestmark = [pytest.mark.timeout(180), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema
DAY = "2026-11-28"
OPERATOR = "ops-li"
# An instant with microseconds: a column that rounds to seconds would show.
PAID_AT = dt.datetime(2026, 11, 28, 14, 37, 5, 123456, tzinfo=SHANGHAI)


def test_counter_payment_record_is_stored_exactly_and_shown(db_url: str) -> None:
    with running_adapter(db_url, operators=[OPERATOR]) as a:
        acct = add_account(a.engine, "01", 7, [BillSpec("202610", 50_000, dt.date(2026, 11, 25))])
        a.clock.set(PAID_AT)
        pays = [("C1", 12_345, "OUT-0571", "TELLER-07", 987_654_321_012),
                ("C2", 100, "OUT-0572", "T2", 0),  # an emptied passbook: balance 0, not "unknown"
                ("C3", 200, "OUT-0573", "T3", None)]  # the bank did not report a balance
        for serial, fen, outlet, teller, balance in pays:
            req = pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=fen, outlet_code=outlet,
                                teller_id=teller, channel=pb.CHANNEL_COUNTER)
            if balance is not None:
                req.bank_balance_fen = balance
            a.stub.Pay(req, metadata=a.md("ICBC"), timeout=10)

        for serial, fen, outlet, teller, balance in pays:
            st = a.stub.GetPayment(pb.GetPaymentRequest(bank_serial=serial), metadata=a.md("ICBC"), timeout=10)
            assert st.state == pb.PAYMENT_STATE_POSTED
            assert st.payment.posted_at.ToDatetime(dt.UTC) == PAID_AT, serial
            assert (st.outlet_code, st.teller_id, st.channel) == (outlet, teller, pb.CHANNEL_COUNTER)
            assert (st.bank_balance_fen if st.HasField("bank_balance_fen") else None) == balance
            assert st.payment.amount_fen == fen

        reports = report_pb2_grpc.ReportServiceStub(a.channel)
        shown = [p for page in reports.CollectionDetail(
            rpb.CollectionDetailRequest(from_date=DAY, to_date=DAY), metadata=[("x-yindian-operator", OPERATOR)],
            timeout=10) for p in page.payments]
        assert [(p.bank_id, p.bank_serial, p.account_no, p.amount_fen, p.channel, p.outlet_code, p.teller_id,
                 p.bank_balance_fen if p.HasField("bank_balance_fen") else None, p.posted_at.ToDatetime(dt.UTC),
                 p.settlement_date, p.state) for p in shown] == [
            ("ICBC", s, acct, fen, "COUNTER", o, t, b, PAID_AT, DAY, "POSTED") for s, fen, o, t, b in pays]
        # another bank's identity sees none of them
        abc = [p for page in reports.CollectionDetail(rpb.CollectionDetailRequest(from_date=DAY, to_date=DAY),
                                                      metadata=a.md("ABC"), timeout=10) for p in page.payments]
        assert abc == []
        with pytest.raises(grpc.RpcError) as exc:
            list(reports.CollectionDetail(rpb.CollectionDetailRequest(from_date=DAY, to_date=DAY), timeout=10))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # the operator's command shows the same record
        out = subprocess.run([sys.executable, "-m", "mis_adapter", "report", "collections-detail", "--db", db_url,
                              "--from", DAY, "--to", DAY, "--format", "json"], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=True).stdout.splitlines()
        rows = [json.loads(line) for line in out[1:]]
        assert [(r["bank_serial"], r["outlet_code"], r["teller_id"], r["bank_balance_fen"], r["posted_at"])
                for r in rows] == [(s, o, t, b, PAID_AT.astimezone(dt.UTC).isoformat()) for s, _f, o, t, b in pays]
