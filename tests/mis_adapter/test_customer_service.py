"""CustomerService through a real gRPC server on each database: the account
overview agrees with QueryAccount and leaks nothing to enumerate with, the
operator roles hold, dunning candidates page and filter, dunning attempts
are idempotent and opt-outs stick."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2

from mis_adapter.db.core import Customer
from mis_adapter.serve import parse
from tests.support.mis_data import BillSpec, RunningAdapter, add_account, row_counts, running_adapter
from yindian.v1 import billing_pb2 as bpb
from yindian.v1 import customer_pb2 as pb
from yindian.v1 import customer_pb2_grpc
from yindian_common.fields import make_account_no
from yindian_common.status import error_info

pytestmark = pytest.mark.migrated("mis")  # running_adapter needs the MIS schema

PORTAL, IVR, DUNNING = "portal", "ivr", "dunning"
ROLES = {"operators": [PORTAL, IVR, DUNNING], "factorless_operators": [IVR], "dunning_operators": [DUNNING]}


@pytest.fixture
def adapter(db_url: str) -> Iterator[RunningAdapter]:
    with running_adapter(db_url, **ROLES) as a:
        yield a


def stub(a: RunningAdapter) -> customer_pb2_grpc.CustomerServiceStub:
    return customer_pb2_grpc.CustomerServiceStub(a.channel)


def op(name: str) -> list[tuple[str, str]]:
    return [("x-yindian-operator", name)]


def ts(t: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def set_phone(a: RunningAdapter, acct: str, phone: str, address: str = "北京市朝阳区建国路88号") -> None:
    t = Customer.__table__
    with a.engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.account_no == acct).values(phone=phone, address=address))


def pay(a: RunningAdapter, acct: str, serial: str, amount_fen: int, channel: int) -> None:
    a.stub.Pay(bpb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=amount_fen, outlet_code="O1",
                              teller_id="T1", channel=channel), metadata=a.md())


def test_overview_agrees_with_query_account_and_shows_history(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 1, [BillSpec("202608", 12_000, dt.date(2026, 9, 25), kwh=150),
                                                 BillSpec("202609", 9_000, dt.date(2026, 10, 25), kwh=110),
                                                 BillSpec("202610", 7_000, dt.date(2026, 11, 25), kwh=90)],
                       tariff_class="COMMERCIAL")
    set_phone(adapter, acct, "13900001234")
    pay(adapter, acct, "S-1", 5_000, bpb.CHANNEL_ATM)        # part of 202608's late fee and principal
    q = adapter.stub.QueryAccount(bpb.QueryAccountRequest(account_no=acct), metadata=adapter.md())
    rest_fen = q.bills[0].principal_due_fen + q.bills[0].late_fee_fen
    pay(adapter, acct, "S-2", rest_fen, bpb.CHANNEL_ONLINE)  # settles 202608 exactly

    o = stub(adapter).GetAccountOverview(pb.GetAccountOverviewRequest(account_no=acct, phone_last4="1234"),
                                         metadata=op(PORTAL))
    q = adapter.stub.QueryAccount(bpb.QueryAccountRequest(account_no=acct), metadata=adapter.md())
    assert (o.arrears_fen, o.late_fee_fen, o.total_due_fen, o.prepaid_fen) == \
        (q.arrears_fen, q.late_fee_fen, q.total_due_fen, q.prepaid_fen)
    assert o.arrears_fen == 16_000 and o.late_fee_fen > 0 and o.as_of_date == "2026-11-28"
    assert o.customer_name == "张**" and o.address == "北京市朝阳区******" and "建国路" not in o.address
    assert o.earliest_unpaid_due_date == "2026-10-25"
    assert [b.period for b in o.bills] == ["202610", "202609", "202608"]
    paid = o.bills[2]
    assert paid.status == bpb.BILL_STATUS_PAID and paid.paid_date == "2026-11-28"
    assert paid.last_payment_channel == bpb.CHANNEL_ONLINE and paid.principal_due_fen == 0
    assert paid.late_fee_paid_fen > 0 and paid.late_fee_due_fen == 0
    assert o.bills[1].status == bpb.BILL_STATUS_UNPAID and o.bills[1].paid_date == ""
    assert o.bills[1].last_payment_channel == bpb.CHANNEL_UNSPECIFIED
    assert sum(b.late_fee_due_fen for b in o.bills) == o.late_fee_fen
    assert (o.last_payment.amount_fen, o.last_payment.channel, o.last_payment.date) == \
        (rest_fen, bpb.CHANNEL_ONLINE, "2026-11-28")
    one = stub(adapter).GetAccountOverview(pb.GetAccountOverviewRequest(account_no=acct, phone_last4="1234",
                                                                        months=1), metadata=op(PORTAL))
    assert [b.period for b in one.bills] == ["202610"]


def test_unknown_account_and_wrong_factor_are_indistinguishable(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 2, [BillSpec("202610", 7_000, dt.date(2026, 11, 25))])
    unknown = make_account_no("01", 999)
    answers = []
    for account_no, last4 in ((acct, "0000"), (unknown, "5678"), (unknown, "0000")):
        with pytest.raises(grpc.RpcError) as exc:
            stub(adapter).GetAccountOverview(pb.GetAccountOverviewRequest(account_no=account_no, phone_last4=last4),
                                             metadata=op(PORTAL))
        info = error_info(exc.value)
        answers.append((exc.value.code(), exc.value.details(), info.reason if info else None))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == grpc.StatusCode.NOT_FOUND and acct not in answers[0][1]


def test_roles(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 3, [BillSpec("202610", 7_000, dt.date(2026, 11, 1))])
    s = stub(adapter)
    overview = pb.GetAccountOverviewRequest(account_no=acct, phone_last4="5678")
    factorless = pb.GetAccountOverviewRequest(account_no=acct, skip_phone_factor=True)
    candidates = pb.ListDunningCandidatesRequest()
    for call, req, md, reason in [
        (s.GetAccountOverview, overview, [], "NOT_AN_OPERATOR"),
        (s.GetAccountOverview, overview, adapter.md("ICBC"), "NOT_AN_OPERATOR"),   # a bank is no operator
        (s.GetAccountOverview, overview, op("mallory"), "NOT_AN_OPERATOR"),
        (s.GetAccountOverview, factorless, op(PORTAL), "OPERATOR_NOT_GRANTED"),
        (s.ListDunningCandidates, candidates, op(PORTAL), "OPERATOR_NOT_GRANTED"),
        (s.ListDunningCandidates, candidates, op(IVR), "OPERATOR_NOT_GRANTED"),
        (s.SetDunningOptOut, pb.SetDunningOptOutRequest(account_no=acct, opted_out=True), op(PORTAL),
         "OPERATOR_NOT_GRANTED"),
    ]:
        with pytest.raises(grpc.RpcError) as exc:
            call(req, metadata=md)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED, (req, md)
        assert error_info(exc.value).reason == reason
    assert s.GetAccountOverview(overview, metadata=op(PORTAL)).arrears_fen == 7_000
    assert s.GetAccountOverview(factorless, metadata=op(IVR)).arrears_fen == 7_000
    assert s.ListDunningCandidates(candidates, metadata=op(DUNNING)).candidates[0].phone == "13812345678"


def test_malformed_fields_are_refused_naming_the_field(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 4, [BillSpec("202610", 7_000, dt.date(2026, 11, 1))])
    s = stub(adapter)
    at = ts(dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC))
    attempt = {"campaign_id": "C-1", "account_no": acct, "attempt_no": 1, "outcome": pb.DUNNING_OUTCOME_PLACED,
               "at": at}
    cases = [
        (s.GetAccountOverview, pb.GetAccountOverviewRequest(account_no=acct[:9] + "0" if acct[9] != "0"
                                                            else acct[:9] + "1", phone_last4="5678"),
         "account_no", PORTAL),
        (s.GetAccountOverview, pb.GetAccountOverviewRequest(account_no=acct), "phone_last4", PORTAL),
        (s.GetAccountOverview, pb.GetAccountOverviewRequest(account_no=acct, phone_last4="56a8"), "phone_last4",
         PORTAL),
        (s.GetAccountOverview, pb.GetAccountOverviewRequest(account_no=acct, phone_last4="5678",
                                                            skip_phone_factor=True), "phone_last4", IVR),
        (s.GetAccountOverview, pb.GetAccountOverviewRequest(account_no=acct, phone_last4="5678", months=25),
         "months", PORTAL),
        (s.ListDunningCandidates, pb.ListDunningCandidatesRequest(page_size=1001), "page_size", DUNNING),
        (s.ListDunningCandidates, pb.ListDunningCandidatesRequest(min_days_overdue=-1), "min_days_overdue",
         DUNNING),
        (s.ListDunningCandidates, pb.ListDunningCandidatesRequest(as_of_date="2026-13-01"), "as_of_date", DUNNING),
        (s.ListDunningCandidates, pb.ListDunningCandidatesRequest(page_token="x"), "page_token", DUNNING),
        (s.RecordDunningAttempt, pb.RecordDunningAttemptRequest(**{**attempt, "campaign_id": "bad id"}),
         "campaign_id", DUNNING),
        (s.RecordDunningAttempt, pb.RecordDunningAttemptRequest(**{**attempt, "attempt_no": 0}), "attempt_no",
         DUNNING),
        (s.RecordDunningAttempt, pb.RecordDunningAttemptRequest(**{**attempt, "attempt_no": 101}), "attempt_no",
         DUNNING),
        (s.RecordDunningAttempt, pb.RecordDunningAttemptRequest(**{**attempt, "outcome": 0}), "outcome", DUNNING),
        (s.RecordDunningAttempt, pb.RecordDunningAttemptRequest(**{**attempt, "at": None}), "at", DUNNING),
        (s.RecordDunningAttempt, pb.RecordDunningAttemptRequest(**{**attempt, "detail": "d" * 129}), "detail",
         DUNNING),
        (s.SetDunningOptOut, pb.SetDunningOptOutRequest(account_no=acct, reason="r" * 129), "reason", DUNNING),
    ]
    before = row_counts(adapter.ctx.router.engines())
    for call, req, field, who in cases:
        with pytest.raises(grpc.RpcError) as exc:
            call(req, metadata=op(who))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, req)
        assert error_info(exc.value).metadata["field"] == field
    assert row_counts(adapter.ctx.router.engines()) == before


def test_dunning_candidates_filter_page_and_price_like_query_account(adapter: RunningAdapter) -> None:
    e = adapter.engine
    old = [add_account(e, "01", 10 + i, [BillSpec("202609", 20_000 + i, dt.date(2026, 10, 25)),
                                          BillSpec("202610", 5_000, dt.date(2026, 11, 25))]) for i in range(5)]
    small = add_account(e, "01", 20, [BillSpec("202609", 500, dt.date(2026, 10, 25))])
    recent = add_account(e, "02", 21, [BillSpec("202610", 30_000, dt.date(2026, 11, 25))])
    add_account(e, "02", 22, [BillSpec("202611", 30_000, dt.date(2026, 12, 25))])   # not yet due
    add_account(e, "02", 23)                                                        # owes nothing
    s = stub(adapter)
    s.SetDunningOptOut(pb.SetDunningOptOutRequest(account_no=old[1], opted_out=True, reason="asked"),
                       metadata=op(DUNNING))

    everyone = s.ListDunningCandidates(pb.ListDunningCandidatesRequest(), metadata=op(DUNNING))
    assert [c.account_no for c in everyone.candidates] == sorted([*old, small, recent])
    assert everyone.next_page_token == ""

    req = pb.ListDunningCandidatesRequest(min_arrears_fen=1_000, min_days_overdue=30, page_size=2)
    seen, pages = [], 0
    while True:
        page = s.ListDunningCandidates(req, metadata=op(DUNNING))
        seen.extend(page.candidates)
        pages += 1
        if not page.next_page_token:
            break
        req.page_token = page.next_page_token
    assert [c.account_no for c in seen] == old and pages == 3
    for c in seen:
        q = adapter.stub.QueryAccount(bpb.QueryAccountRequest(account_no=c.account_no), metadata=adapter.md())
        assert (c.arrears_fen, c.late_fee_fen, c.total_due_fen) == (q.arrears_fen, q.late_fee_fen, q.total_due_fen)
        assert c.oldest_due_date == "2026-10-25" and c.days_overdue == 34 and c.unpaid_bills == 2
        assert c.phone == "13812345678" and c.customer_name == "张**"
        assert c.opted_out == (c.account_no == old[1])


def test_dunning_attempts_are_idempotent_per_key(adapter: RunningAdapter) -> None:
    acct = add_account(adapter.engine, "01", 30, [BillSpec("202609", 9_000, dt.date(2026, 10, 25))])
    s = stub(adapter)
    t0 = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)

    def record(outcome: int, minutes: int, attempt_no: int = 1) -> pb.RecordDunningAttemptResponse:
        return s.RecordDunningAttempt(pb.RecordDunningAttemptRequest(
            campaign_id="C-20261128", account_no=acct, attempt_no=attempt_no, outcome=outcome,
            at=ts(t0 + dt.timedelta(minutes=minutes))), metadata=op(DUNNING))

    assert not record(pb.DUNNING_OUTCOME_PLACED, 0).replayed
    assert record(pb.DUNNING_OUTCOME_PLACED, 0).replayed
    done = record(pb.DUNNING_OUTCOME_NO_ANSWER, 1)
    assert not done.replayed and done.attempt.outcome == pb.DUNNING_OUTCOME_NO_ANSWER
    assert done.attempt.placed_at.ToDatetime(dt.UTC) == t0
    late = record(pb.DUNNING_OUTCOME_PLACED, 0)     # a late duplicate of the first record
    assert late.replayed and late.attempt.outcome == pb.DUNNING_OUTCOME_NO_ANSWER
    with pytest.raises(grpc.RpcError) as exc:
        record(pb.DUNNING_OUTCOME_ANSWERED, 2)
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(exc.value).reason == "ATTEMPT_CONFLICT"
    record(pb.DUNNING_OUTCOME_BUSY, 60, attempt_no=2)

    listed = s.ListDunningAttempts(pb.ListDunningAttemptsRequest(account_no=acct), metadata=op(DUNNING))
    assert [(a.attempt_no, a.outcome) for a in listed.attempts] == \
        [(1, pb.DUNNING_OUTCOME_NO_ANSWER), (2, pb.DUNNING_OUTCOME_BUSY)]
    since = s.ListDunningAttempts(pb.ListDunningAttemptsRequest(account_no=acct,
                                                                since=ts(t0 + dt.timedelta(minutes=30))),
                                  metadata=op(DUNNING))
    assert [a.attempt_no for a in since.attempts] == [2] and not since.truncated
    with pytest.raises(grpc.RpcError) as exc:
        s.RecordDunningAttempt(pb.RecordDunningAttemptRequest(
            campaign_id="C-1", account_no=make_account_no("01", 998), attempt_no=1,
            outcome=pb.DUNNING_OUTCOME_PLACED, at=ts(t0)), metadata=op(DUNNING))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_operator_flags_env_and_toml(monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse(["--operator", "portal", "--operators", "ivr", "--dunning-operator", "ivr"])
    assert s.operators == ["portal", "ivr"] and s.dunning_operators == ["ivr"] and s.factorless_operators == []
    monkeypatch.setenv("YINDIAN_OPERATORS", '["a", "b"]')
    assert parse([]).operators == ["a", "b"]


def test_candidates_page_across_branch_databases(tmp_path: Path) -> None:
    """Branch 02 in its own database: pages merge both databases in account order, none lost or repeated."""
    with running_adapter(f"sqlite:///{tmp_path / 'front.db'}", branch_db=[f"02=sqlite:///{tmp_path / 'b02.db'}"],
                         **ROLES) as a:
        engines = a.ctx.router.engines()
        assert len(engines) == 2
        due = [BillSpec("202609", 10_000, dt.date(2026, 10, 25))]
        expected = []
        for i in range(4):
            for branch in ("01", "02"):
                acct = make_account_no(branch, 100 + i)
                expected.append(add_account(a.ctx.router.engine_for(acct), branch, 100 + i, due))
        req = pb.ListDunningCandidatesRequest(page_size=3)
        seen: list[str] = []
        while True:
            page = stub(a).ListDunningCandidates(req, metadata=op(DUNNING))
            seen.extend(c.account_no for c in page.candidates)
            if not page.next_page_token:
                break
            req.page_token = page.next_page_token
        assert seen == sorted(expected)
        overview = stub(a).GetAccountOverview(pb.GetAccountOverviewRequest(
            account_no=expected[1], phone_last4="5678"), metadata=op(PORTAL))
        assert overview.branch_code == "02" and overview.arrears_fen == 10_000
