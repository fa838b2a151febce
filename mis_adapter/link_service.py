"""The wire edge of the link's other transactions in mis_adapter's
BillingService: agreements (SignAgreement, EndAgreement, ListAgreements),
refunds to the bank (ListRefunds, AcknowledgeRefunds) and the bank's
sign-on, sign-off and echo. BillingServicer delegates each RPC here.

Validates fields, converts proto <-> domain (mis_adapter.agreements,
refunds, link_state) and maps domain errors to statuses. The bank comes
from the link, never from the body. SignAgreement, EndAgreement and
AcknowledgeRefunds change the bank's business with the utility: refused
UNAVAILABLE while the operator suspended the bank (停工), and counted in its
concurrency limit; the others answer while suspended (SignOn is recorded,
and every answer says `suspended`)."""
from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2

from mis_adapter import agreements as ag
from mis_adapter import link_state as ls
from mis_adapter import refunds as rf
from mis_adapter.banks import settlement_day
from mis_adapter.context import AdapterContext
from yindian.v1 import billing_pb2 as pb
from yindian_common import fields
from yindian_common.clock import business_date, utc_now
from yindian_common.db import watched_until_deadline
from yindian_common.errors import DayClosed, InvalidField
from yindian_common.identity import bank_of
from yindian_common.status import guard

log = logging.getLogger("mis_adapter.link")
R = TypeVar("R")

NONCE_MAX = 32
_NONCE_RE = re.compile(r"[A-Za-z0-9-]{0,32}")
AGREEMENT_STATE = {ag.ACTIVE: pb.AGREEMENT_STATE_ACTIVE, ag.ENDED: pb.AGREEMENT_STATE_ENDED}
LINK_STATE = {ls.SIGNED_ON: pb.LINK_STATE_SIGNED_ON, ls.SIGNED_OFF: pb.LINK_STATE_SIGNED_OFF,
              ls.OPEN: pb.LINK_STATE_OPEN}


def _ts(t: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if t is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t.astimezone(dt.UTC))
    return out


def agreement_to_proto(a: ag.AgreementView) -> pb.Agreement:
    return pb.Agreement(agreement_serial=a.agreement_serial, account_no=a.account_no,
                        savings_account_ref=a.savings_account_ref, debit_limit_fen=a.debit_limit_fen or 0,
                        start_date=a.start_date.isoformat(), state=AGREEMENT_STATE[a.state],
                        end_date=a.end_date.isoformat() if a.end_date else "", end_serial=a.end_serial,
                        signed_at=_ts(a.signed_at), ended_at=_ts(a.ended_at))


def refund_to_proto(r: rf.RefundView) -> pb.RefundNotice:
    return pb.RefundNotice(refund_id=r.refund_id, account_no=r.account_no, original_serial=r.original_serial,
                           bill_id=r.bill_id, amount_fen=r.amount_fen, savings_account_ref=r.savings_account_ref,
                           offered_at=_ts(r.offered_at))


def sign_command(bank_id: str, req: pb.SignAgreementRequest) -> ag.SignCommand:
    start = None
    if req.start_date:
        start = fields.iso_date(req.start_date, "start_date")
    limit = req.debit_limit_fen if req.HasField("debit_limit_fen") else None
    return ag.SignCommand(bank_id, req.agreement_serial, req.account_no, req.savings_account_ref, limit, start)


def _changing(ctx: AdapterContext, context: grpc.ServicerContext, rpc: str, work: Callable[[str], R]) -> R:
    with guard(context, rpc), watched_until_deadline(context.time_remaining()):
        bank_id = bank_of(context, tls=ctx.tls)
        ctx.banks.ensure_active(bank_id)
        with ctx.banks.slot(bank_id):
            return work(bank_id)


def _reading(ctx: AdapterContext, context: grpc.ServicerContext, rpc: str, work: Callable[[str], R]) -> R:
    with guard(context, rpc), watched_until_deadline(context.time_remaining()):
        bank_id = bank_of(context, tls=ctx.tls)
        ctx.banks.ensure_known(bank_id)
        return work(bank_id)


# ---- agreements ----

def sign_agreement(ctx: AdapterContext, req: pb.SignAgreementRequest,
                   context: grpc.ServicerContext) -> pb.SignAgreementResponse:
    def work(bank_id: str) -> pb.SignAgreementResponse:
        cmd = sign_command(bank_id, req)
        engine = ctx.router.engine_for(req.account_no)
        r = ag.sign(engine, cmd, business_date(ctx.clock), utc_now(ctx.clock))
        log.info("event=agreement_signed bank=%s serial=%s replayed=%s", bank_id, req.agreement_serial, r.replayed)
        return pb.SignAgreementResponse(agreement=agreement_to_proto(r.agreement), replayed=r.replayed)
    return _changing(ctx, context, "SignAgreement", work)


def end_agreement(ctx: AdapterContext, req: pb.EndAgreementRequest,
                  context: grpc.ServicerContext) -> pb.EndAgreementResponse:
    def work(bank_id: str) -> pb.EndAgreementResponse:
        cmd = ag.EndCommand(bank_id, req.end_serial, req.account_no, req.reason)
        engine = ctx.router.engine_for(req.account_no)
        r = ag.end(engine, cmd, business_date(ctx.clock), utc_now(ctx.clock))
        log.info("event=agreement_ended bank=%s serial=%s replayed=%s withdrawn=%d", bank_id, req.end_serial,
                 r.replayed, r.withdrawn_notices)
        return pb.EndAgreementResponse(agreement=agreement_to_proto(r.agreement), replayed=r.replayed,
                                       withdrawn_notices=r.withdrawn_notices)
    return _changing(ctx, context, "EndAgreement", work)


def list_agreements(ctx: AdapterContext, req: pb.ListAgreementsRequest,
                    context: grpc.ServicerContext) -> pb.ListAgreementsResponse:
    def work(bank_id: str) -> pb.ListAgreementsResponse:
        page = ag.list_agreements(ctx.router.engines(), bank_id, page_size=req.page_size,
                                  page_token=req.page_token, account_no=req.account_no,
                                  active_only=req.active_only)
        return pb.ListAgreementsResponse(agreements=[agreement_to_proto(a) for a in page.agreements],
                                         next_page_token=page.next_page_token)
    return _reading(ctx, context, "ListAgreements", work)


# ---- refunds ----

def refund_databases(ctx: AdapterContext) -> list[rf.RefundDatabase]:
    """Every MIS database refunds are offered from, with its refund id number (mis_adapter.refunds)."""
    return rf.databases_of(ctx.router.database_keys(), ctx.router.engines())


def list_refunds(ctx: AdapterContext, req: pb.ListRefundsRequest,
                 context: grpc.ServicerContext) -> pb.ListRefundsResponse:
    def work(bank_id: str) -> pb.ListRefundsResponse:
        return pb.ListRefundsResponse(refunds=[refund_to_proto(r) for r in
                                               rf.list_open_across(refund_databases(ctx), bank_id,
                                                                   req.page_size)])
    return _reading(ctx, context, "ListRefunds", work)


def acknowledge_refunds(ctx: AdapterContext, req: pb.AcknowledgeRefundsRequest,
                        context: grpc.ServicerContext) -> pb.AcknowledgeRefundsResponse:
    def work(bank_id: str) -> pb.AcknowledgeRefundsResponse:
        if len(req.acks) > rf.ACK_BATCH_MAX:
            raise InvalidField("acks", f"at most {rf.ACK_BATCH_MAX} acknowledgements per call")
        acks = [rf.RefundAckIn(a.refund_id, a.credit_serial, a.amount_fen) for a in req.acks]
        r = rf.acknowledge_across(refund_databases(ctx), bank_id, acks, business_date(ctx.clock),
                                  utc_now(ctx.clock))
        log.info("event=refunds_acknowledged bank=%s new=%d replayed=%d fen=%d", bank_id, r.acknowledged,
                 r.replayed, r.acknowledged_fen)
        return pb.AcknowledgeRefundsResponse(acknowledged=r.acknowledged, replayed=r.replayed,
                                             settlement_date=r.settlement_date.isoformat() if r.settlement_date
                                             else "")
    return _changing(ctx, context, "AcknowledgeRefunds", work)


# ---- sign-on, sign-off, echo ----

def link_status(ctx: AdapterContext, v: ls.LinkView) -> pb.LinkStatus:
    today = business_date(ctx.clock)
    try:
        with ctx.router.primary.connect() as conn:
            settles = settlement_day(conn, v.bank_id, today).isoformat()
    except DayClosed:
        settles = ""  # today and tomorrow both reconciled: pays are refused
    return pb.LinkStatus(state=LINK_STATE[v.state],
                         business_date=v.business_date.isoformat() if v.business_date else "",
                         changed_at=_ts(v.changed_at), suspended=v.suspended, settlement_date=settles)


def mirror_link(ctx: AdapterContext, v: ls.LinkView) -> None:
    """With branch databases, each branch database gets the primary's link state before the bank is
    answered, so that a pay posted in any branch after the answer settles as the link says. A crash
    between the databases is healed by the bank's retry of the same sign-on/off, and at start (`serve`)."""
    for engine in ctx.router.engines()[1:]:
        ls.mirror(engine, v)


def sign_on(ctx: AdapterContext, req: pb.SignOnRequest, context: grpc.ServicerContext) -> pb.SignOnResponse:
    def work(bank_id: str) -> pb.SignOnResponse:
        v = ls.sign_on(ctx.router.primary, bank_id, business_date(ctx.clock), utc_now(ctx.clock))
        mirror_link(ctx, v)
        log.info("event=signed_on bank=%s suspended=%s", bank_id, v.suspended)
        return pb.SignOnResponse(link=link_status(ctx, v))
    return _reading(ctx, context, "SignOn", work)


def sign_off(ctx: AdapterContext, req: pb.SignOffRequest, context: grpc.ServicerContext) -> pb.SignOffResponse:
    def work(bank_id: str) -> pb.SignOffResponse:
        v = ls.sign_off(ctx.router.primary, bank_id, business_date(ctx.clock), utc_now(ctx.clock))
        mirror_link(ctx, v)
        log.info("event=signed_off bank=%s", bank_id)
        return pb.SignOffResponse(link=link_status(ctx, v))
    return _reading(ctx, context, "SignOff", work)


def echo(ctx: AdapterContext, req: pb.EchoRequest, context: grpc.ServicerContext) -> pb.EchoResponse:
    def work(bank_id: str) -> pb.EchoResponse:
        if not req.nonce.isascii() or not _NONCE_RE.fullmatch(req.nonce):
            raise InvalidField("nonce", f"must be at most {NONCE_MAX} characters of A-Z a-z 0-9 -")
        with ctx.router.primary.connect() as conn:
            v = ls.read_link(conn, bank_id)
        return pb.EchoResponse(nonce=req.nonce, utility_time=_ts(utc_now(ctx.clock)), link=link_status(ctx, v))
    return _reading(ctx, context, "Echo", work)
