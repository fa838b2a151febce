"""The wire edge of CustomerService (protos/yindian/v1/customer.proto): the
utility's own customer channels (web portal, telephone self-service, voice
dunning) ask mis_adapter about households. Checks the caller is a utility
operator with the role the RPC needs, validates fields, converts proto <->
domain and maps domain errors to statuses. The figures come from customers.py.

Must never: answer a bank identity (banks reach mis_adapter through their
bridge and have no business with household contacts), return a full phone
number outside ListDunningCandidates, or write anything for a refused call."""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2

from mis_adapter import customers
from mis_adapter.context import AdapterContext
from yindian.v1 import billing_pb2, customer_pb2_grpc
from yindian.v1 import customer_pb2 as pb
from yindian_common import fields, identity
from yindian_common.clock import business_date
from yindian_common.db import watched_until_deadline
from yindian_common.errors import Forbidden, InvalidField
from yindian_common.status import guard

log = logging.getLogger("mis_adapter.customers")
R = TypeVar("R")

OVERVIEW_MONTHS_DEFAULT = 12
OVERVIEW_MONTHS_MAX = 24
CANDIDATES_PAGE_DEFAULT = 100
CANDIDATES_PAGE_MAX = 1_000
CANDIDATES_DAYS_OVERDUE_MAX = 3_660
ATTEMPT_NO_MAX = 100
DETAIL_MAX = fields.REASON_MAX
PHONE_LAST4_LEN = 4
INSTANT_MIN = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
INSTANT_MAX = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)

CHANNELS = {"COUNTER": billing_pb2.CHANNEL_COUNTER, "AUTO_DEBIT": billing_pb2.CHANNEL_AUTO_DEBIT,
            "ATM": billing_pb2.CHANNEL_ATM, "ONLINE": billing_pb2.CHANNEL_ONLINE}
BILL_STATUS = {"UNPAID": billing_pb2.BILL_STATUS_UNPAID, "PARTIAL": billing_pb2.BILL_STATUS_PARTIAL,
               "PAID": billing_pb2.BILL_STATUS_PAID}
OUTCOMES = {pb.DUNNING_OUTCOME_PLACED: "PLACED", pb.DUNNING_OUTCOME_ANSWERED: "ANSWERED",
            pb.DUNNING_OUTCOME_NO_ANSWER: "NO_ANSWER", pb.DUNNING_OUTCOME_BUSY: "BUSY",
            pb.DUNNING_OUTCOME_FAILED: "FAILED", pb.DUNNING_OUTCOME_SKIPPED_PAID: "SKIPPED_PAID",
            pb.DUNNING_OUTCOME_SKIPPED_OPT_OUT: "SKIPPED_OPT_OUT"}
OUTCOME_PB = {v: k for k, v in OUTCOMES.items()}


def add_operator_flags(parser: argparse.ArgumentParser) -> None:
    """Singular, repeatable spellings of the role settings (`--operator NAME`),
    beside the generated `--operators`; skipped if something registered them already."""
    for flag, dest in (("--operator", "operators"), ("--factorless-operator", "factorless_operators"),
                       ("--dunning-operator", "dunning_operators")):
        with contextlib.suppress(argparse.ArgumentError):
            parser.add_argument(flag, dest=dest, action="append", default=None,
                                help=f"same as --{dest.replace('_', '-')}")


def _operator_of(context: grpc.ServicerContext, rpc: str, *, tls: bool, operators: Sequence[str]) -> str:
    """The utility operator calling (yindian_common.identity: the certificate under
    mTLS, `x-yindian-operator` metadata in plain-text loopback mode), listed in the
    `operators` setting. Anyone else is PERMISSION_DENIED, audited."""
    caller = identity.caller_of(context, tls=tls, operators=operators)
    if caller is None or not caller.is_operator:
        raise identity.deny(rpc, "NOT_AN_OPERATOR",
                            "CustomerService needs a utility operator identity named in mis_adapter's operators",
                            caller)
    return caller.name


def _require_role(operator: str, granted: Sequence[str], setting: str) -> None:
    if operator not in granted:
        raise Forbidden(f"operator {operator!r} is not in {setting}", reason="OPERATOR_NOT_GRANTED")


def _ts(t: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t.astimezone(dt.UTC))
    return out


def _instant(value: timestamp_pb2.Timestamp, field: str) -> dt.datetime:
    try:
        t = value.ToDatetime(dt.UTC)
    except (ValueError, OverflowError):
        raise InvalidField(field, "is not a valid instant") from None
    if not INSTANT_MIN <= t <= INSTANT_MAX:
        raise InvalidField(field, f"must be between {INSTANT_MIN.year} and {INSTANT_MAX.year}")
    return t


def _bounded(value: int, field: str, lo: int, hi: int, default: int | None = None) -> int:
    if default is not None and value == 0:
        return default
    if not lo <= value <= hi:
        raise InvalidField(field, f"must be between {lo} and {hi}")
    return value


# ---- proto -> domain, validating ----
def overview_args(req: pb.GetAccountOverviewRequest) -> tuple[str, str | None, int]:
    fields.account_no(req.account_no)
    if req.skip_phone_factor:
        if req.phone_last4:
            raise InvalidField("phone_last4", "must be empty with skip_phone_factor")
        last4: str | None = None
    else:
        last4 = req.phone_last4
        if len(last4) != PHONE_LAST4_LEN or not last4.isascii() or not last4.isdigit():
            raise InvalidField("phone_last4", "must be the 4 last digits of the registered phone")
    months = _bounded(req.months, "months", 1, OVERVIEW_MONTHS_MAX, OVERVIEW_MONTHS_DEFAULT)
    return req.account_no, last4, months


def attempt_command(req: pb.RecordDunningAttemptRequest, operator: str) -> customers.AttemptCommand:
    fields.serial(req.campaign_id, "campaign_id")
    fields.account_no(req.account_no)
    _bounded(req.attempt_no, "attempt_no", 1, ATTEMPT_NO_MAX)
    outcome = OUTCOMES.get(req.outcome)
    if outcome is None:
        raise InvalidField("outcome", "must be one of " + ", ".join(OUTCOMES.values()))
    if not req.HasField("at"):
        raise InvalidField("at", "is required")
    fields.text(req.detail, "detail", DETAIL_MAX)
    return customers.AttemptCommand(req.campaign_id, req.account_no, req.attempt_no, outcome,
                                    _instant(req.at, "at"), req.detail, operator)


# ---- domain -> proto ----
def overview_response(v: customers.Overview) -> pb.GetAccountOverviewResponse:
    resp = pb.GetAccountOverviewResponse(
        account_no=v.account_no, customer_name=v.customer_name, address=v.address, branch_code=v.branch_code,
        arrears_fen=v.arrears_fen, late_fee_fen=v.late_fee_fen, prepaid_fen=v.prepaid_fen,
        total_due_fen=v.total_due_fen,
        earliest_unpaid_due_date=v.earliest_unpaid_due_date.isoformat() if v.earliest_unpaid_due_date else "",
        as_of_date=v.as_of.isoformat(), closed=v.closed,
        bills=[pb.OverviewBill(period=b.period, kwh=b.kwh, amount_fen=b.amount_fen,
                               principal_due_fen=b.principal_due_fen, late_fee_due_fen=b.late_fee_due_fen,
                               late_fee_paid_fen=b.late_fee_paid_fen, status=BILL_STATUS[b.status],
                               due_date=b.due_date.isoformat(),
                               paid_date=b.paid_date.isoformat() if b.paid_date else "",
                               last_payment_channel=CHANNELS.get(b.last_payment_channel,
                                                                 billing_pb2.CHANNEL_UNSPECIFIED),
                               prepaid_applied_fen=b.prepaid_applied_fen) for b in v.bills])
    if v.last_payment is not None:
        resp.last_payment.CopyFrom(pb.LastPayment(
            date=v.last_payment.date.isoformat(), amount_fen=v.last_payment.amount_fen,
            channel=CHANNELS.get(v.last_payment.channel, billing_pb2.CHANNEL_UNSPECIFIED)))
    return resp


def candidate_pb(c: customers.DunningCandidate) -> pb.DunningCandidate:
    return pb.DunningCandidate(account_no=c.account_no, customer_name=c.customer_name, phone=c.phone,
                               branch_code=c.branch_code, arrears_fen=c.arrears_fen, late_fee_fen=c.late_fee_fen,
                               total_due_fen=c.total_due_fen, oldest_due_date=c.oldest_due_date.isoformat(),
                               days_overdue=c.days_overdue, unpaid_bills=c.unpaid_bills, opted_out=c.opted_out)


def attempt_pb(a: customers.Attempt) -> pb.DunningAttempt:
    return pb.DunningAttempt(campaign_id=a.campaign_id, account_no=a.account_no, attempt_no=a.attempt_no,
                             outcome=OUTCOME_PB[a.outcome], placed_at=_ts(a.placed_at),
                             outcome_at=_ts(a.outcome_at), detail=a.detail)


class CustomerServicer(customer_pb2_grpc.CustomerServiceServicer):
    def __init__(self, ctx: AdapterContext) -> None:
        self.ctx = ctx
        self.operators = tuple(ctx.settings.operators)

    def _handle(self, context: grpc.ServicerContext, rpc: str, fn: Callable[[str], R],
                role: tuple[Sequence[str], str] | None = None) -> R:
        # The one status guard; its refusal log carries account numbers at most (masked by the log filter),
        # never the phone factor or a name.
        with guard(context, rpc), watched_until_deadline(context.time_remaining()):
            operator = _operator_of(context, rpc, tls=self.ctx.tls, operators=self.operators)
            if role is not None:
                _require_role(operator, *role)
            return fn(operator)
        raise AssertionError("unreachable")  # guard aborts the call on a refusal

    def _dunning_role(self) -> tuple[Sequence[str], str]:
        return self.ctx.settings.dunning_operators, "dunning_operators"

    def GetAccountOverview(self, request: pb.GetAccountOverviewRequest, context: grpc.ServicerContext
                           ) -> pb.GetAccountOverviewResponse:
        role = (self.ctx.settings.factorless_operators, "factorless_operators") if request.skip_phone_factor else None

        def run(operator: str) -> pb.GetAccountOverviewResponse:
            account_no, last4, months = overview_args(request)
            return overview_response(customers.account_overview(self.ctx, account_no, last4, months))
        return self._handle(context, "GetAccountOverview", run, role)

    def ListDunningCandidates(self, request: pb.ListDunningCandidatesRequest, context: grpc.ServicerContext
                              ) -> pb.ListDunningCandidatesResponse:
        def run(operator: str) -> pb.ListDunningCandidatesResponse:
            as_of = (fields.iso_date(request.as_of_date, "as_of_date") if request.as_of_date
                     else business_date(self.ctx.clock))
            _bounded(request.min_arrears_fen, "min_arrears_fen", 0, fields.AMOUNT_MAX_FEN)
            _bounded(request.min_days_overdue, "min_days_overdue", 0, CANDIDATES_DAYS_OVERDUE_MAX)
            size = _bounded(request.page_size, "page_size", 1, CANDIDATES_PAGE_MAX, CANDIDATES_PAGE_DEFAULT)
            after = fields.account_no(request.page_token, "page_token") if request.page_token else ""
            page = customers.dunning_candidates(self.ctx, as_of, request.min_arrears_fen, request.min_days_overdue,
                                                size, after)
            log.info("event=dunning_candidates operator=%s as_of=%s count=%d", operator, as_of, len(page.candidates))
            return pb.ListDunningCandidatesResponse(candidates=[candidate_pb(c) for c in page.candidates],
                                                    next_page_token=page.next_after, as_of_date=as_of.isoformat())
        return self._handle(context, "ListDunningCandidates", run, self._dunning_role())

    def RecordDunningAttempt(self, request: pb.RecordDunningAttemptRequest, context: grpc.ServicerContext
                             ) -> pb.RecordDunningAttemptResponse:
        def run(operator: str) -> pb.RecordDunningAttemptResponse:
            attempt, replayed = customers.record_attempt(self.ctx, attempt_command(request, operator))
            return pb.RecordDunningAttemptResponse(attempt=attempt_pb(attempt), replayed=replayed)
        return self._handle(context, "RecordDunningAttempt", run, self._dunning_role())

    def ListDunningAttempts(self, request: pb.ListDunningAttemptsRequest, context: grpc.ServicerContext
                            ) -> pb.ListDunningAttemptsResponse:
        def run(operator: str) -> pb.ListDunningAttemptsResponse:
            fields.account_no(request.account_no)
            if request.campaign_id:
                fields.serial(request.campaign_id, "campaign_id")
            since = _instant(request.since, "since") if request.HasField("since") else None
            attempts, truncated = customers.list_attempts(self.ctx, request.account_no, since, request.campaign_id,
                                                          self.ctx.settings.dunning_attempts_list_max)
            return pb.ListDunningAttemptsResponse(attempts=[attempt_pb(a) for a in attempts], truncated=truncated)
        return self._handle(context, "ListDunningAttempts", run, self._dunning_role())

    def SetDunningOptOut(self, request: pb.SetDunningOptOutRequest, context: grpc.ServicerContext
                         ) -> pb.SetDunningOptOutResponse:
        def run(operator: str) -> pb.SetDunningOptOutResponse:
            fields.account_no(request.account_no)
            fields.text(request.reason, "reason", fields.REASON_MAX)
            r = customers.set_opt_out(self.ctx, request.account_no, request.opted_out, request.reason, operator)
            log.info("event=dunning_opt_out operator=%s account=%s opted_out=%s", operator, r.account_no, r.opted_out)
            return pb.SetDunningOptOutResponse(account_no=r.account_no, opted_out=r.opted_out,
                                               updated_at=_ts(r.updated_at))
        return self._handle(context, "SetDunningOptOut", run, self._dunning_role())
