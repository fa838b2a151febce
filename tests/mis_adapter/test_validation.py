"""Every malformed field of DESIGN.md's field rules gets INVALID_ARGUMENT
naming the field, and the database is unchanged (row counts compared)."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import grpc
import pytest

from tests.support.mis_data import BillSpec, RunningAdapter, add_account, row_counts, running_adapter
from yindian.v1 import billing_pb2 as pb
from yindian_common.status import error_info

pytestmark = pytest.mark.migrated("mis")  # running_adapter needs the MIS schema


@pytest.fixture
def adapter(db_url: str) -> Iterator[RunningAdapter]:
    with running_adapter(db_url) as a:
        yield a


def test_malformed_fields_are_refused_naming_the_field(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, [BillSpec("202610", 10_000, dt.date(2026, 11, 25))])
    good = {"bank_serial": "OK-1", "account_no": acct, "amount_fen": 1_000, "outlet_code": "O1",
            "teller_id": "T1", "channel": pb.CHANNEL_COUNTER}
    bad_account = acct[:9] + str((int(acct[9]) + 1) % 10)
    pay_cases = [
        ("account_no", {"account_no": bad_account}),          # check digit
        ("account_no", {"account_no": acct[:9]}),              # too short
        ("account_no", {"account_no": "01000000１7"}),          # not ASCII digits
        ("account_no", {"account_no": ""}),
        ("amount_fen", {"amount_fen": 0}),
        ("amount_fen", {"amount_fen": -5}),
        ("amount_fen", {"amount_fen": 1_000_000_001}),
        ("bank_serial", {"bank_serial": ""}),
        ("bank_serial", {"bank_serial": "A" * 33}),
        ("bank_serial", {"bank_serial": "has space"}),
        ("bank_serial", {"bank_serial": "semi;colon"}),
        ("bank_serial", {"bank_serial": "流水1"}),
        ("outlet_code", {"outlet_code": "O" * 17}),
        ("teller_id", {"teller_id": "T" * 17}),
        ("channel", {"channel": pb.CHANNEL_UNSPECIFIED}),
        ("channel", {"channel": 42}),
        ("bank_balance_fen", {"bank_balance_fen": -1}),
    ]
    cancel_good = {"cancel_serial": "C-1", "original_serial": "OK-1", "amount_fen": 1_000, "reason": "r"}
    cancel_cases = [
        ("cancel_serial", {"cancel_serial": ""}),
        ("cancel_serial", {"cancel_serial": "x" * 33}),
        ("original_serial", {"original_serial": "bad serial"}),
        ("amount_fen", {"amount_fen": 0}),
        ("reason", {"reason": "r" * 129}),
    ]
    before = row_counts(adapter.ctx.router.engines())
    for field, change in pay_cases:
        with pytest.raises(grpc.RpcError) as exc:
            adapter.stub.Pay(pb.PayRequest(**{**good, **change}), metadata=adapter.md())
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, change
        assert field in exc.value.details(), change
        assert error_info(exc.value).metadata["field"] == field
    for field, change in cancel_cases:
        with pytest.raises(grpc.RpcError) as exc:
            adapter.stub.Cancel(pb.CancelRequest(**{**cancel_good, **change}), metadata=adapter.md())
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, change
        assert error_info(exc.value).metadata["field"] == field
    for req, call in ((pb.QueryAccountRequest(account_no=bad_account), adapter.stub.QueryAccount),
                      (pb.GetPaymentRequest(bank_serial="x" * 40), adapter.stub.GetPayment)):
        with pytest.raises(grpc.RpcError) as exc:
            call(req, metadata=adapter.md())
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert row_counts(adapter.ctx.router.engines()) == before
    # and the good request still works
    adapter.stub.Pay(pb.PayRequest(**good), metadata=adapter.md())


def test_oversized_message_is_refused(adapter: RunningAdapter) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        adapter.stub.Pay(pb.PayRequest(bank_serial="x" * (5 * 1024 * 1024)), metadata=adapter.md())
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
