"""The Pay edge's conversions (mis_adapter.service) against the plain rules they shortcut: the fast
field verdicts refuse exactly what the field rules refuse, naming the same field; the timestamp and
the response are the ones protobuf's own helpers build."""
from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from mis_adapter import service
from mis_adapter.allocation import Allocation
from mis_adapter.payments import PayCommand, PayResult
from yindian.v1 import billing_pb2 as pb
from yindian_common import fields
from yindian_common.errors import InvalidField


def _field_rules(bank_id: str, req: pb.PayRequest) -> PayCommand | str:
    """The field rules one by one, in the contract's order: the command, or the refused field."""
    try:
        fields.serial(req.bank_serial, "bank_serial")
        fields.account_no(req.account_no)
        fields.amount_fen(req.amount_fen)
        fields.code(req.outlet_code, "outlet_code")
        fields.code(req.teller_id, "teller_id")
        channel = service.CHANNEL_NAMES.get(req.channel)
        if channel is None:
            raise InvalidField("channel", "")
        balance = req.bank_balance_fen if req.HasField("bank_balance_fen") else None
        if balance is not None and not 0 <= balance <= 10**15:
            raise InvalidField("bank_balance_fen", "")
    except InvalidField as exc:
        return exc.field
    return PayCommand(bank_id, req.bank_serial, req.account_no, req.amount_fen, req.outlet_code, req.teller_id,
                      channel, balance)


_ACCOUNTS = st.one_of(st.builds(lambda b, n: fields.make_account_no(f"{b:02d}", n), st.integers(0, 99),
                                st.integers(0, 9_999_999)),
                      st.text(alphabet="0123456789x１ ", max_size=11))


@given(serial=st.text(alphabet="AZaz09-_ ;流", max_size=34), account=_ACCOUNTS,
       amount=st.integers(-2, fields.AMOUNT_MAX_FEN + 2) | st.sampled_from([0, 1, fields.AMOUNT_MAX_FEN]),
       outlet=st.text(alphabet="AZaz09-_ é", max_size=18) | st.sampled_from(["O" * 16, "O" * 17]),
       teller=st.text(alphabet="Tt1_-é ", max_size=18) | st.sampled_from(["T" * 16, "T" * 17]),
       channel=st.sampled_from([0, 1, 2, 3, 4, 42]), balance=st.none() | st.integers(-1, 10**15 + 1))
@settings(max_examples=600, deadline=None)
def test_pay_command_refuses_what_the_field_rules_refuse_naming_the_same_field(
        serial: str, account: str, amount: int, outlet: str, teller: str, channel: int, balance: int | None) -> None:
    req = pb.PayRequest(bank_serial=serial, account_no=account, amount_fen=amount, outlet_code=outlet,
                        teller_id=teller, channel=channel)  # type: ignore[arg-type]
    if balance is not None:
        req.bank_balance_fen = balance
    expected = _field_rules("ICBC", req)
    try:
        got: PayCommand | str = service.pay_command("ICBC", req)
    except InvalidField as exc:
        got = exc.field
    assert got == expected


@given(st.text(alphabet="AZaz09-_ é;", max_size=18) | st.sampled_from(["", "c" * 16, "c" * 17, "é"]))
@settings(max_examples=300, deadline=None)
def test_fast_code_verdict_is_the_field_rule(value: str) -> None:
    try:
        fields.code(value, "c")
        valid = True
    except InvalidField:
        valid = False
    assert fields.code_ok(value) == valid


_AWARE = st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1),
                      timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=8)),
                                                 dt.timezone(dt.timedelta(hours=-5, minutes=-30))]))


def _from_datetime(t: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t.astimezone(dt.UTC))
    return out


@given(_AWARE | st.datetimes(min_value=dt.datetime(1971, 1, 2), max_value=dt.datetime(2200, 1, 1)))
@settings(max_examples=500, deadline=None)
def test_timestamps_are_protobufs_own(t: dt.datetime) -> None:
    assert service.ts(t) == _from_datetime(t)


@given(posted=_AWARE, allocations=st.lists(st.tuples(st.integers(1, 10**12), st.integers(0, 10**9),
                                                     st.integers(0, 10**9)), max_size=5))
@settings(max_examples=200, deadline=None)
def test_pay_response_is_the_result_field_by_field(posted: dt.datetime,
                                                   allocations: list[tuple[int, int, int]]) -> None:
    r = PayResult("01-42", "R0120261130000042", dt.date(2026, 11, 30),
                  tuple(Allocation(bill_id=b, late_fee_fen=f, principal_fen=p) for b, f, p in allocations),
                  123, 45, "S-1", "0100000017", 1_000, posted)
    assert service.pay_response(r) == pb.PayResponse(
        payment_id=r.payment_id, receipt_no=r.receipt_no, settlement_date="2026-11-30",
        allocations=[pb.Allocation(bill_id=b, late_fee_fen=f, principal_fen=p) for b, f, p in allocations],
        arrears_after_fen=123, prepaid_after_fen=45, bank_serial="S-1", account_no="0100000017", amount_fen=1_000,
        posted_at=_from_datetime(posted))


@pytest.mark.parametrize("t", [dt.datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC),
                               dt.datetime(1970, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=8)))])
def test_timestamps_before_the_epoch_are_protobufs_own(t: dt.datetime) -> None:
    assert service.ts(t) == _from_datetime(t)
