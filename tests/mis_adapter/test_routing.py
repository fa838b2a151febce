"""Branch routing: accounts of a branch with its own database live there;
payments, tombstones and queries find them (a utility with two branch databases)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from mis_adapter.db.core import Payment
from tests.support.databases import fresh_database
from tests.support.mis_data import BillSpec, add_account, running_adapter
from yindian.v1 import billing_pb2 as pb


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_branch_databases(backend: str, tmp_path: Path) -> None:
    with (fresh_database(backend, tmp_path, "main") as main_url,
          fresh_database(backend, tmp_path, "b02") as b02_url,
          running_adapter(main_url, branch_db=[f"02={b02_url}"]) as a):
        if True:
            e_main, e_02 = a.ctx.router.engines()
            bill = [BillSpec("202610", 10_000, dt.date(2026, 11, 25))]
            acct1 = add_account(e_main, "01", 1, bill)
            acct2 = add_account(e_02, "02", 1, bill)
            assert a.ctx.router.engine_for(acct2) is e_02
            for serial, acct in (("S1", acct1), ("S2", acct2)):
                a.stub.Pay(pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=10_100,
                                         channel=pb.CHANNEL_COUNTER), metadata=a.md())
            t = Payment.__table__
            for engine, serial in ((e_main, "S1"), (e_02, "S2")):
                with engine.connect() as conn:
                    assert [r.bank_serial for r in conn.execute(sa.select(t.c.bank_serial))] == [serial]
            assert a.stub.GetPayment(pb.GetPaymentRequest(bank_serial="S2"), metadata=a.md()).state == \
                pb.PAYMENT_STATE_POSTED
            c = a.stub.Cancel(pb.CancelRequest(cancel_serial="C2", original_serial="S2", amount_fen=10_100),
                              metadata=a.md())
            assert c.outcome == pb.CANCEL_OUTCOME_REVERSED
            # a tombstone reaches every branch database
            a.stub.Cancel(pb.CancelRequest(cancel_serial="C3", original_serial="S3", amount_fen=500), metadata=a.md())
            for acct in (acct1, acct2):
                with pytest.raises(grpc.RpcError) as exc:
                    a.stub.Pay(pb.PayRequest(bank_serial="S3", account_no=acct, amount_fen=500,
                                             channel=pb.CHANNEL_COUNTER), metadata=a.md())
                assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_databases_in_branch_code_order_whatever_the_flag_order(tmp_path: Path) -> None:
    """Transactions that span databases lock them in engines() order: two replicas given the
    --branch-db flags in different orders must still take the locks in the same order."""
    from mis_adapter.routing import BranchRouter

    urls = {code: f"sqlite:///{tmp_path / f'b{code}.db'}" for code in ("02", "03", "04")}
    orders = [["04", "02", "03"], ["03", "04", "02"], ["02", "03", "04"]]
    seen = []
    for order in orders:
        router = BranchRouter(f"sqlite:///{tmp_path / 'main.db'}", {c: urls[c] for c in order})
        seen.append([str(e.url) for e in router.engines()])
        router.dispose()
    assert seen[0] == seen[1] == seen[2]
    assert seen[0][1:] == [urls["02"], urls["03"], urls["04"]]
