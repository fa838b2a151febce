"""The portal's gRPC edge: one CustomerService.GetAccountOverview call per
look-up, under the portal's operator identity, with a deadline; the answer
converted to the portal's own frozen types. Only this module imports
generated code.

    UpstreamError
    ├── NoMatch       NOT_FOUND: unknown account or wrong phone digits (one answer)
    ├── BadInput      INVALID_ARGUMENT: the portal let a malformed field through
    └── Unavailable   anything else: mis_adapter down, slow, or refusing us"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import grpc
import grpc.aio

from portal.settings import PortalSettings
from yindian.v1 import billing_pb2, customer_pb2, customer_pb2_grpc
from yindian_common.server import channel_options, check_plaintext_allowed

log = logging.getLogger("portal.upstream")

OPERATOR_METADATA = "x-yindian-operator"
CHANNELS = {billing_pb2.CHANNEL_COUNTER: "COUNTER", billing_pb2.CHANNEL_AUTO_DEBIT: "AUTO_DEBIT",
            billing_pb2.CHANNEL_ATM: "ATM", billing_pb2.CHANNEL_ONLINE: "ONLINE"}
STATUSES = {billing_pb2.BILL_STATUS_UNPAID: "UNPAID", billing_pb2.BILL_STATUS_PARTIAL: "PARTIAL",
            billing_pb2.BILL_STATUS_PAID: "PAID"}


class UpstreamError(Exception):
    pass


class NoMatch(UpstreamError):
    pass


class BadInput(UpstreamError):
    pass


class Unavailable(UpstreamError):
    pass


@dataclass(frozen=True)
class Bill:
    period: str  # YYYYMM
    kwh: int
    amount_fen: int
    principal_due_fen: int
    late_fee_due_fen: int
    late_fee_paid_fen: int
    status: str  # UNPAID, PARTIAL, PAID
    due_date: dt.date
    paid_date: dt.date | None
    channel: str  # "" when no payment settled part of it
    prepaid_applied_fen: int


@dataclass(frozen=True)
class Payment:
    date: dt.date
    amount_fen: int
    channel: str


@dataclass(frozen=True)
class Overview:
    account_no: str
    customer_name: str  # masked by mis_adapter
    address: str  # masked by mis_adapter
    arrears_fen: int
    late_fee_fen: int
    prepaid_fen: int
    total_due_fen: int
    earliest_unpaid_due_date: dt.date | None
    bills: tuple[Bill, ...]  # newest first
    last_payment: Payment | None
    as_of: dt.date
    closed: bool


def _date(s: str) -> dt.date | None:
    return dt.date.fromisoformat(s) if s else None


def overview_from_pb(r: customer_pb2.GetAccountOverviewResponse) -> Overview:
    bills = tuple(Bill(b.period, b.kwh, b.amount_fen, b.principal_due_fen, b.late_fee_due_fen, b.late_fee_paid_fen,
                       STATUSES.get(b.status, "UNPAID"), dt.date.fromisoformat(b.due_date), _date(b.paid_date),
                       CHANNELS.get(b.last_payment_channel, ""), b.prepaid_applied_fen) for b in r.bills)
    last = (Payment(dt.date.fromisoformat(r.last_payment.date), r.last_payment.amount_fen,
                    CHANNELS.get(r.last_payment.channel, "")) if r.HasField("last_payment") else None)
    return Overview(r.account_no, r.customer_name, r.address, r.arrears_fen, r.late_fee_fen, r.prepaid_fen,
                    r.total_due_fen, _date(r.earliest_unpaid_due_date), bills, last,
                    dt.date.fromisoformat(r.as_of_date), r.closed)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Upstream:
    """mis_adapter's CustomerService, over one channel opened in the app's event loop."""

    def __init__(self, settings: PortalSettings) -> None:
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub: customer_pb2_grpc.CustomerServiceStub | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    def open(self) -> None:
        s = self.settings
        opts = channel_options(s.upstream_max_message_bytes)
        tls = s.upstream_tls()
        if tls is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=_read(tls.ca), private_key=_read(tls.key),
                                                 certificate_chain=_read(tls.cert))
            self._channel = grpc.aio.secure_channel(s.upstream, creds, options=opts)
        else:
            if not s.insecure:
                raise SystemExit("no TLS files given: pass --tls-cert/--tls-key/--tls-ca, or --insecure on loopback")
            check_plaintext_allowed(s.upstream, s.force_insecure)
            self._channel = grpc.aio.insecure_channel(s.upstream, options=opts)
            # Plain text: the operator is named in metadata (mTLS: by the certificate).
            self._metadata = ((OPERATOR_METADATA, s.operator),)
        self._stub = customer_pb2_grpc.CustomerServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def overview(self, account_no: str, phone_last4: str) -> Overview:
        assert self._stub is not None, "Upstream.open() first"
        req = customer_pb2.GetAccountOverviewRequest(account_no=account_no, phone_last4=phone_last4,
                                                     months=self.settings.overview_months)
        try:
            resp = await self._stub.GetAccountOverview(req, timeout=self.settings.upstream_deadline_s,
                                                       metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise NoMatch() from exc
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise BadInput(exc.details() or "") from exc
            # PERMISSION_DENIED here is our misconfiguration, not the customer's: say so loudly in the log.
            log.warning("event=upstream_failed code=%s details=%r", code.name, exc.details())
            raise Unavailable(code.name) from exc
        return overview_from_pb(resp)
