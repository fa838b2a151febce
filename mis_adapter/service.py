"""The wire edge of mis_adapter's BillingService: validates fields, converts
proto <-> domain, asks the link who the bank is, and maps domain errors to
gRPC statuses. Business rules live in payments.py and below."""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2

from mis_adapter import account_query, feed_service, link_service, payments, recon_service
from mis_adapter.context import AdapterContext
from mis_adapter.control_totals_service import ControlTotalsDesk
from mis_adapter.payments import CancelCommand, PayCommand, PayResult
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common import db_watch, fields
from yindian_common.db import watched_until_deadline
from yindian_common.errors import InvalidField
from yindian_common.identity import bank_of
from yindian_common.rpc_pools import on_pool
from yindian_common.status import guard, guard_stream

log = logging.getLogger("mis_adapter.service")
R = TypeVar("R")

CHANNEL_NAMES = {pb.CHANNEL_COUNTER: "COUNTER", pb.CHANNEL_AUTO_DEBIT: "AUTO_DEBIT", pb.CHANNEL_ATM: "ATM",
                 pb.CHANNEL_ONLINE: "ONLINE"}
CHANNEL_CODES = {name: code for code, name in CHANNEL_NAMES.items()}
BILL_STATUS = {"UNPAID": pb.BILL_STATUS_UNPAID, "PARTIAL": pb.BILL_STATUS_PARTIAL, "PAID": pb.BILL_STATUS_PAID}
PAYMENT_STATE = {"POSTED": pb.PAYMENT_STATE_POSTED, "REVERSED": pb.PAYMENT_STATE_REVERSED,
                 "NOT_FOUND": pb.PAYMENT_STATE_NOT_FOUND, "REFUSED": pb.PAYMENT_STATE_REFUSED}
CANCEL_OUTCOME = {"REVERSED": pb.CANCEL_OUTCOME_REVERSED, "ORIGINAL_NOT_FOUND": pb.CANCEL_OUTCOME_ORIGINAL_NOT_FOUND}


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def ts(t: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    set_ts(out, t)
    return out


def set_ts(out: timestamp_pb2.Timestamp, t: dt.datetime) -> None:
    """`out.FromDatetime(t.astimezone(UTC))`, exactly, in a fifth of its time for an aware `t` (every
    Pay answers one): whole seconds and microseconds of the difference from the epoch."""
    if t.tzinfo is None:  # naive: local time, as astimezone reads it
        out.FromDatetime(t.astimezone(dt.UTC))
        return
    since = t - _EPOCH
    out.seconds = since.days * 86_400 + since.seconds
    out.nanos = since.microseconds * 1_000


# ---- proto -> domain, validating ----
def pay_command(bank_id: str, req: pb.PayRequest) -> PayCommand:
    serial, account, amount = req.bank_serial, req.account_no, req.amount_fen
    outlet, teller = req.outlet_code, req.teller_id
    if not (fields.serial_ok(serial) and fields.account_no_ok(account)
            and fields.AMOUNT_MIN_FEN <= amount <= fields.AMOUNT_MAX_FEN
            and fields.code_ok(outlet) and fields.code_ok(teller)):
        # Some field is wrong: the checks that name it, in the contract's order.
        fields.serial(serial, "bank_serial")
        fields.account_no(account)
        fields.amount_fen(amount)
        fields.code(outlet, "outlet_code")
        fields.code(teller, "teller_id")
    channel = CHANNEL_NAMES.get(req.channel)
    if channel is None:
        raise InvalidField("channel", "must be COUNTER, AUTO_DEBIT, ATM or ONLINE")
    balance = req.bank_balance_fen if req.HasField("bank_balance_fen") else None
    if balance is not None and not 0 <= balance <= 10**15:
        raise InvalidField("bank_balance_fen", "must be between 0 and 10^15 fen")
    return PayCommand(bank_id, serial, account, amount, outlet, teller, channel, balance)


def cancel_command(bank_id: str, req: pb.CancelRequest) -> CancelCommand:
    fields.serial(req.cancel_serial, "cancel_serial")
    fields.serial(req.original_serial, "original_serial")
    fields.amount_fen(req.amount_fen)
    fields.text(req.reason, "reason", fields.REASON_MAX)
    return CancelCommand(bank_id, req.cancel_serial, req.original_serial, req.amount_fen, req.reason)


# ---- domain -> proto ----
def pay_response(r: PayResult) -> pb.PayResponse:
    resp = pb.PayResponse(
        payment_id=r.payment_id, receipt_no=r.receipt_no, settlement_date=r.settlement_date.isoformat(),
        arrears_after_fen=r.arrears_after_fen, prepaid_after_fen=r.prepaid_after_fen, bank_serial=r.bank_serial,
        account_no=r.account_no, amount_fen=r.amount_fen)
    set_ts(resp.posted_at, r.posted_at)
    add = resp.allocations.add  # in place: no Allocation message built and then copied in
    for a in r.allocations:
        add(bill_id=a.bill_id, late_fee_fen=a.late_fee_fen, principal_fen=a.principal_fen)
    return resp


def account_response(v: payments.AccountView) -> pb.QueryAccountResponse:
    return pb.QueryAccountResponse(
        account_no=v.account_no, customer_name=v.customer_name, branch_code=v.branch_code,
        arrears_fen=v.arrears_fen, late_fee_fen=v.late_fee_fen, total_due_fen=v.total_due_fen,
        prepaid_fen=v.prepaid_fen, as_of_date=v.as_of.isoformat(), closed=v.closed,
        bills=[pb.Bill(bill_id=b.bill_id, period=b.period, kwh=b.kwh, amount_fen=b.amount_fen,
                       late_fee_fen=b.late_fee_fen, due_date=b.due_date.isoformat(), status=BILL_STATUS[b.status],
                       principal_due_fen=b.principal_due_fen) for b in v.bills])


# The calls that block on the pays' database connections (rpc_pools: on the money pool, when given).
MONEY_MOVING = ("Pay", "Cancel")


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self, ctx: AdapterContext, money_pool: Executor | None = None) -> None:
        self.ctx = ctx
        self.control = ControlTotalsDesk(ctx)
        if money_pool is not None:
            for rpc in MONEY_MOVING:
                setattr(self, rpc, on_pool(getattr(self, rpc), money_pool))

    def _bank(self, context: grpc.ServicerContext) -> str:
        """The calling bank, from the link (certificate, or metadata in plain-text mode)."""
        return bank_of(context, tls=self.ctx.tls)

    def _due(self, context: grpc.ServicerContext) -> db_watch.calls_due:
        """The bank's status read included (db.watched_until_deadline)."""
        return watched_until_deadline(context.time_remaining())

    def _money_moving(self, context: grpc.ServicerContext, rpc: str, work: Callable[[str], R]) -> R:
        with guard(context, rpc), self._due(context):
            bank_id = self._bank(context)
            self.ctx.banks.ensure_active(bank_id)
            with self.ctx.banks.slot(bank_id):
                return work(bank_id)

    def QueryAccount(self, request: pb.QueryAccountRequest, context: grpc.ServicerContext) -> pb.QueryAccountResponse:
        with guard(context, "QueryAccount"), self._due(context):
            self.ctx.banks.ensure_known(self._bank(context))
            fields.account_no(request.account_no)
            return account_response(account_query.query_account(self.ctx, request.account_no))

    def Pay(self, request: pb.PayRequest, context: grpc.ServicerContext) -> pb.PayResponse:
        def work(bank_id: str) -> pb.PayResponse:
            result = payments.pay(self.ctx, pay_command(bank_id, request), time_left_s=context.time_remaining())
            log.debug("event=pay bank=%s serial=%s amount_fen=%d payment_id=%s", bank_id, request.bank_serial,
                     request.amount_fen, result.payment_id)
            return pay_response(result)
        return self._money_moving(context, "Pay", work)

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        def work(bank_id: str) -> pb.CancelResponse:
            r = payments.cancel(self.ctx, cancel_command(bank_id, request), time_left_s=context.time_remaining())
            log.debug("event=cancel bank=%s serial=%s original=%s outcome=%s", bank_id, request.cancel_serial,
                     request.original_serial, r.outcome)
            return pb.CancelResponse(outcome=CANCEL_OUTCOME[r.outcome], settlement_date=r.settlement_date.isoformat(),
                                     cancel_serial=r.cancel_serial, original_serial=r.original_serial)
        return self._money_moving(context, "Cancel", work)

    def GetPayment(self, request: pb.GetPaymentRequest, context: grpc.ServicerContext) -> pb.GetPaymentResponse:
        with guard(context, "GetPayment"), self._due(context):
            bank_id = self._bank(context)
            self.ctx.banks.ensure_known(bank_id)
            fields.serial(request.bank_serial, "bank_serial")
            st = payments.get_payment(self.ctx, bank_id, request.bank_serial)
            resp = pb.GetPaymentResponse(state=PAYMENT_STATE[st.state])
            if st.payment is not None:
                resp.payment.CopyFrom(pay_response(st.payment))
                # What the bank reported with it, as stored (a RECONCILE posting has no proto channel).
                resp.outlet_code, resp.teller_id = st.outlet_code, st.teller_id
                resp.channel = CHANNEL_CODES.get(st.channel, pb.CHANNEL_UNSPECIFIED)
                if st.bank_balance_fen is not None:
                    resp.bank_balance_fen = st.bank_balance_fen
            return resp

    def Reconcile(self, request_iterator: Iterator[pb.ReconcileRequest], context: grpc.ServicerContext
                  ) -> Iterator[pb.ReconcileResponse]:
        with guard(context, "Reconcile"), self._due(context):
            bank_id = self._bank(context)
            self.ctx.banks.ensure_known(bank_id)  # before it takes a share: unknown ids hold none
        return guard_stream(context, "Reconcile", self.ctx.shares.stream(
            bank_id, recon_service.reconcile(self.ctx, bank_id, request_iterator, context)))

    def BillFeed(self, request_iterator: Iterator[pb.BillFeedRequest], context: grpc.ServicerContext
                 ) -> Iterator[pb.BillFeedResponse]:
        with guard(context, "BillFeed"):
            bank_id = self._bank(context)
        return guard_stream(context, "BillFeed", feed_service.bill_feed(self.ctx, bank_id, request_iterator, context),
                            database="MIS database")

    # ---- the link's other transactions (mis_adapter.link_service) ----
    def SignAgreement(self, request: pb.SignAgreementRequest, context: grpc.ServicerContext) -> pb.SignAgreementResponse:
        return link_service.sign_agreement(self.ctx, request, context)

    def EndAgreement(self, request: pb.EndAgreementRequest, context: grpc.ServicerContext) -> pb.EndAgreementResponse:
        return link_service.end_agreement(self.ctx, request, context)

    def ListAgreements(self, request: pb.ListAgreementsRequest, context: grpc.ServicerContext) -> pb.ListAgreementsResponse:
        return link_service.list_agreements(self.ctx, request, context)

    def ListRefunds(self, request: pb.ListRefundsRequest, context: grpc.ServicerContext) -> pb.ListRefundsResponse:
        return link_service.list_refunds(self.ctx, request, context)

    def AcknowledgeRefunds(self, request: pb.AcknowledgeRefundsRequest, context: grpc.ServicerContext) -> pb.AcknowledgeRefundsResponse:
        return link_service.acknowledge_refunds(self.ctx, request, context)

    def SignOn(self, request: pb.SignOnRequest, context: grpc.ServicerContext) -> pb.SignOnResponse:
        return link_service.sign_on(self.ctx, request, context)

    def SignOff(self, request: pb.SignOffRequest, context: grpc.ServicerContext) -> pb.SignOffResponse:
        return link_service.sign_off(self.ctx, request, context)

    def Echo(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> pb.EchoResponse:
        return link_service.echo(self.ctx, request, context)

    # ---- continuous reconciliation (mis_adapter.control_totals_service) ----
    def ExchangeControlTotals(self, request: pb.ExchangeControlTotalsRequest, context: grpc.ServicerContext
                              ) -> pb.ExchangeControlTotalsResponse:
        return self.control.exchange(request, context)
