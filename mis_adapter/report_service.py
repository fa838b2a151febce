"""The wire edge of ReportService (back-office statistics): checks the
caller's role, validates the request, converts proto <-> domain and maps
domain errors to statuses. The figures come from reports.py; nothing here
computes them.

Roles (yindian_common.identity; DESIGN.md): an operator (a name in the
`operators` setting) sees everything; a bank the utility knows sees only its
own collections (CollectionSummary and CollectionDetail restricted to its
payments); arrears and household detail are for operators only. Every
refusal is PERMISSION_DENIED, audited (log event and counter)."""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

import grpc

from mis_adapter import reports
from mis_adapter.context import AdapterContext
from yindian.v1 import report_pb2 as pb
from yindian.v1 import report_pb2_grpc
from yindian_common import db_watch, fields, identity
from yindian_common.clock import business_date
from yindian_common.db import deadline_due, watched_until_deadline
from yindian_common.errors import Forbidden, InvalidField
from yindian_common.identity import Caller
from yindian_common.status import guard

log = logging.getLogger("mis_adapter.reports")

GROUP_BY = {pb.GROUP_BY_BANK: "bank", pb.GROUP_BY_OUTLET: "outlet", pb.GROUP_BY_BRANCH: "branch",
            pb.GROUP_BY_DAY: "day", pb.GROUP_BY_CHANNEL: "channel"}


def collection_row_pb(r: reports.CollectionRow) -> pb.CollectionRow:
    return pb.CollectionRow(key=r.key, count=r.count, amount_fen=r.amount_fen, cancelled_count=r.cancelled_count,
                            cancelled_fen=r.cancelled_fen)


def arrears_row_pb(r: reports.ArrearsRow) -> pb.ArrearsRow:
    return pb.ArrearsRow(branch_code=r.branch_code, households=r.households, principal_fen=r.principal_fen,
                         late_fee_fen=r.late_fee_fen)


def arrears_account_pb(a: reports.ArrearsAccount) -> pb.ArrearsAccount:
    return pb.ArrearsAccount(account_no=a.account_no, customer_name=a.customer_name, contact_phone=a.contact_phone,
                             branch_code=a.branch_code, unpaid_bills=a.unpaid_bills, principal_fen=a.principal_fen,
                             late_fee_fen=a.late_fee_fen, oldest_period=a.oldest_period)


def collected_payment_pb(p: reports.CollectedPayment) -> pb.CollectedPayment:
    out = pb.CollectedPayment(bank_id=p.bank_id, bank_serial=p.bank_serial, account_no=p.account_no,
                              branch_code=p.branch_code, amount_fen=p.amount_fen, channel=p.channel,
                              outlet_code=p.outlet_code, teller_id=p.teller_id,
                              settlement_date=p.settlement_date.isoformat(), state=p.state,
                              reversed_on=p.reversed_on.isoformat() if p.reversed_on else "",
                              payment_id=str(p.payment_id))
    if p.bank_balance_fen is not None:
        out.bank_balance_fen = p.bank_balance_fen
    out.posted_at.FromDatetime(p.posted_at.astimezone(dt.UTC))
    return out


def past_or_today(ctx: AdapterContext, value: str, field: str) -> dt.date:
    day = fields.iso_date(value, field)
    if day > business_date(ctx.clock):
        raise InvalidField(field, f"{day} is in the future")
    return day


def branch_filter(value: str) -> str:
    if value and (len(value) != 2 or not value.isascii() or not value.isdigit()):
        raise InvalidField("branch_code", "must be 2 digits, or empty for every branch")
    return value

class ReportServicer(report_pb2_grpc.ReportServiceServicer):
    def __init__(self, ctx: AdapterContext) -> None:
        self.ctx = ctx
        self._operators = frozenset(ctx.settings.operators)

    def _due(self, context: grpc.ServicerContext) -> db_watch.calls_due:
        """A unary report's round trips, the bank's status read included, end by the caller's deadline on a
        dead link (db.watched_until_deadline)."""
        return watched_until_deadline(context.time_remaining())

    def _stream_due(self, context: grpc.ServicerContext) -> float:
        """When a detail stream's round trips are due (db.deadline_due: its deadline; 0: none), taken once at
        its start: the stream reads between its yields, each read under its own scope (db_watch.read_by),
        since grpcio may ask for the next page in another context."""
        return deadline_due(context.time_remaining())

    # ---- roles ----
    def _caller(self, context: grpc.ServicerContext, rpc: str) -> Caller:
        """An operator, or a bank the utility knows; anyone else is refused (audited)."""
        caller = identity.require_caller(context, rpc, tls=self.ctx.tls, operators=self._operators)
        if caller.is_operator:
            return caller
        try:
            self.ctx.banks.ensure_known(caller.name)
        except Forbidden as err:
            raise identity.deny(rpc, "UNKNOWN_BANK", err.message, caller) from err
        return caller

    def _operator(self, context: grpc.ServicerContext, rpc: str) -> Caller:
        caller = identity.require_caller(context, rpc, tls=self.ctx.tls, operators=self._operators)
        if not caller.is_operator:
            raise identity.deny(rpc, "OPERATOR_ONLY", f"{rpc} is for the utility's operators", caller)
        return caller

    @staticmethod
    def _bank_scope(rpc: str, caller: Caller, requested: str) -> str:
        """The bank whose payments the caller may see: an operator any (or all: ''), a bank its own."""
        if caller.is_operator:
            return requested
        if requested and requested != caller.name:
            raise identity.deny(rpc, "OTHER_BANK", "a bank sees only its own collections", caller)
        return caller.name

    def CollectionSummary(self, request: pb.CollectionSummaryRequest, context: grpc.ServicerContext
                          ) -> pb.CollectionSummaryResponse:
        with guard(context, "CollectionSummary"), self._due(context):
            caller = self._caller(context, "CollectionSummary")
            frm = fields.iso_date(request.from_date, "from_date")
            to = past_or_today(self.ctx, request.to_date, "to_date")
            group_by = GROUP_BY.get(request.group_by)
            if group_by is None:
                raise InvalidField("group_by", "must be BANK, OUTLET, BRANCH, DAY or CHANNEL")
            rep = reports.collection_summary(self.ctx.router.engines(), frm, to, group_by,
                                             self._bank_scope("CollectionSummary", caller, ""))
            return pb.CollectionSummaryResponse(rows=[collection_row_pb(r) for r in rep.rows],
                                                total=collection_row_pb(rep.total))

    def ArrearsSummary(self, request: pb.ArrearsSummaryRequest, context: grpc.ServicerContext
                       ) -> pb.ArrearsSummaryResponse:
        with guard(context, "ArrearsSummary"), self._due(context):
            self._operator(context, "ArrearsSummary")
            as_of = past_or_today(self.ctx, request.as_of_date, "as_of_date")
            rep = reports.arrears_summary(self.ctx.router.engines(), as_of, self.ctx.rates, self.ctx.clock.tz)
            return pb.ArrearsSummaryResponse(rows=[arrears_row_pb(r) for r in rep.rows],
                                             total=arrears_row_pb(rep.total), as_of_date=as_of.isoformat())

    def ArrearsDetail(self, request: pb.ArrearsDetailRequest, context: grpc.ServicerContext
                      ) -> Iterator[pb.ArrearsDetailResponse]:
        with guard(context, "ArrearsDetail"):
            due = self._stream_due(context)
            self._operator(context, "ArrearsDetail")
            as_of = past_or_today(self.ctx, request.as_of_date, "as_of_date")
            branch = branch_filter(request.branch_code)
            pages: Iterator[Any] = reports.arrears_detail(self.ctx.router.engines(), as_of, self.ctx.rates,
                                                          self.ctx.clock.tz, branch)
            for page in db_watch.read_by(pages, due):
                yield pb.ArrearsDetailResponse(accounts=[arrears_account_pb(a) for a in page])

    def CollectionDetail(self, request: pb.CollectionDetailRequest, context: grpc.ServicerContext
                         ) -> Iterator[pb.CollectionDetailResponse]:
        with guard(context, "CollectionDetail"):
            due = self._stream_due(context)
            with db_watch.calls_due(due):
                caller = self._caller(context, "CollectionDetail")
            frm = fields.iso_date(request.from_date, "from_date")
            to = past_or_today(self.ctx, request.to_date, "to_date")
            fields.code(request.bank_id, "bank_id")
            fields.code(request.outlet_code, "outlet_code")
            bank = self._bank_scope("CollectionDetail", caller, request.bank_id)
            pages: Iterator[Any] = reports.collection_detail(self.ctx.router.engines(), frm, to, bank,
                                                             request.outlet_code)
            for page in db_watch.read_by(pages, due):
                yield pb.CollectionDetailResponse(payments=[collected_payment_pb(p) for p in page])
