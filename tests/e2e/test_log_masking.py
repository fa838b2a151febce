"""Issue 9 item 10: refusals logged at INFO quoted full account numbers
(`event=refused ... msg='account 0100012343 not found'`, 106 of them in the
probe). A real mis_adapter's log masks them as it masks names and phones,
while the bank still gets its own account number back in the status."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from mis_adapter.routing import BranchRouter
from mis_adapter.seed import seed
from tests.support import procs
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine
from yindian_common.fields import make_account_no, mask_account

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
CLOCK = "2026-11-28T10:00:00+08:00"
BANK = [("x-yindian-bank-id", "ICBC")]


@pytest.fixture
def adapter(tmp_path: Path) -> Iterator[tuple[procs.Proc, str]]:
    url = f"sqlite:///{tmp_path / 'mis.db'}"
    router = BranchRouter(url, {})
    seed(router, 10, tmp_path / "rosters", today=dt.date(2026, 11, 28), now=dt.datetime.fromisoformat(CLOCK))
    router.dispose()
    mis = procs.start("mis_adapter", ["mis_adapter", "serve", "--db", url, "--listen", "127.0.0.1:0",
                                      "--metrics-port", "0", "--insecure", "--clock-start", CLOCK])
    try:
        yield mis, url
    finally:
        mis.terminate()


def test_refusals_never_log_a_full_account_number(adapter: tuple[procs.Proc, str]) -> None:
    mis, url = adapter
    eng = make_engine(url, pool_size=1)
    with eng.begin() as conn:
        closed = conn.execute(sa.text("SELECT account_no FROM customers ORDER BY account_no")).scalars().first()
        conn.execute(sa.text("UPDATE customers SET status = 'CLOSED' WHERE account_no = :a"), {"a": closed})
    eng.dispose()
    unknown = [make_account_no("09", 9_000_000 + i) for i in range(3)]
    with grpc.insecure_channel(mis.grpc_addr) as ch:
        stub = billing_pb2_grpc.BillingServiceStub(ch)
        for acct in unknown:
            with pytest.raises(grpc.RpcError) as exc:
                stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=BANK, timeout=10)
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
            assert acct in (exc.value.details() or "")  # the bank is told about its own request
            with pytest.raises(grpc.RpcError):
                stub.Pay(pb.PayRequest(bank_serial=f"M{acct}", account_no=acct, amount_fen=100,
                                       channel=pb.CHANNEL_COUNTER), metadata=BANK, timeout=10)
        with pytest.raises(grpc.RpcError) as exc:
            stub.Pay(pb.PayRequest(bank_serial="MCLOSED", account_no=str(closed), amount_fen=100,
                                   channel=pb.CHANNEL_COUNTER), metadata=BANK, timeout=10)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert mis.terminate() == 0
    log = "".join(mis.output)
    assert "event=refused" in log
    for acct in [*unknown, str(closed)]:
        assert acct not in log, f"{acct} logged in full"
        assert mask_account(acct) in log
