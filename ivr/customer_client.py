"""The IVR's and the dunning process's link to mis_adapter's CustomerService:
every call carries the utility operator identity and a deadline, and every
answer becomes a domain value or one of

    CustomerError
    ├── AccountUnknown      NOT_FOUND (unknown account)
    ├── AccountRejected     INVALID_ARGUMENT (e.g. bad check digit)
    ├── AttemptConflict     ALREADY_EXISTS (an attempt recorded differently)
    └── UpstreamFailed      anything else (unavailable, deadline, refused role)

This is the only ivr module that imports generated protobuf types; the
values it returns are ivr.accounts' plain dataclasses."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import grpc
from google.protobuf import timestamp_pb2

from ivr.accounts import OUTCOMES, Attempt, Candidate, LastPayment, Overview
from yindian.v1 import billing_pb2, customer_pb2, customer_pb2_grpc

OPERATOR_METADATA = "x-yindian-operator"


class CustomerError(Exception):
    pass


class AccountUnknown(CustomerError):
    pass


class AccountRejected(CustomerError):
    pass


class AttemptConflict(CustomerError):
    pass


class UpstreamFailed(CustomerError):
    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def _date(value: str) -> dt.date | None:
    return dt.date.fromisoformat(value) if value else None


def _ts(when: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when.astimezone(dt.UTC))
    return ts


def _from_ts(ts: timestamp_pb2.Timestamp) -> dt.datetime:
    return ts.ToDatetime(tzinfo=dt.UTC)


def _translate(exc: grpc.RpcError, what: str) -> CustomerError:
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    message = f"{what}: {code.name} {exc.details() or ''}"  # type: ignore[attr-defined]
    if code == grpc.StatusCode.NOT_FOUND:
        return AccountUnknown(message)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return AccountRejected(message)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return AttemptConflict(message)
    return UpstreamFailed(message, code)


class CustomerClient:
    def __init__(self, channel: grpc.Channel, operator: str, timeout_s: float,
                 candidates_page_size: int = 500) -> None:
        self._stub = customer_pb2_grpc.CustomerServiceStub(channel)
        self._metadata = ((OPERATOR_METADATA, operator),) if operator else ()
        self.timeout_s = timeout_s
        self.candidates_page_size = candidates_page_size

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: object, what: str) -> object:
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _translate(exc, what) from exc

    def overview(self, account_no: str) -> Overview:
        """By account number alone (the IVR's caller keyed it in; the operator
        must be a factorless operator in mis_adapter)."""
        r = self._call(self._stub.GetAccountOverview,
                       customer_pb2.GetAccountOverviewRequest(account_no=account_no, skip_phone_factor=True,
                                                              months=1), "GetAccountOverview")
        assert isinstance(r, customer_pb2.GetAccountOverviewResponse)
        last = None
        if r.HasField("last_payment"):
            last = LastPayment(dt.date.fromisoformat(r.last_payment.date), r.last_payment.amount_fen,
                               billing_pb2.Channel.Name(r.last_payment.channel).removeprefix("CHANNEL_"))
        return Overview(account_no=r.account_no, arrears_fen=r.arrears_fen, late_fee_fen=r.late_fee_fen,
                        total_due_fen=r.total_due_fen, prepaid_fen=r.prepaid_fen,
                        earliest_unpaid_due_date=_date(r.earliest_unpaid_due_date), last_payment=last,
                        closed=r.closed)

    def candidates(self, as_of: dt.date, min_arrears_fen: int, min_days_overdue: int,
                   pages_max: int) -> Iterator[Candidate]:
        token = ""
        for _ in range(pages_max):
            r = self._call(self._stub.ListDunningCandidates, customer_pb2.ListDunningCandidatesRequest(
                as_of_date=as_of.isoformat(), min_arrears_fen=min_arrears_fen, min_days_overdue=min_days_overdue,
                page_size=self.candidates_page_size, page_token=token), "ListDunningCandidates")
            assert isinstance(r, customer_pb2.ListDunningCandidatesResponse)
            for c in r.candidates:
                yield Candidate(account_no=c.account_no, phone=c.phone, arrears_fen=c.arrears_fen,
                                late_fee_fen=c.late_fee_fen, total_due_fen=c.total_due_fen,
                                oldest_due_date=dt.date.fromisoformat(c.oldest_due_date),
                                days_overdue=c.days_overdue, opted_out=c.opted_out)
            token = r.next_page_token
            if not token:
                return
        raise UpstreamFailed(f"more than {pages_max} pages of dunning candidates")

    def attempts(self, account_no: str, *, since: dt.datetime | None = None, campaign_id: str = "") -> list[Attempt]:
        """A household's attempts placed since an instant (all when None), of one campaign or all."""
        request = customer_pb2.ListDunningAttemptsRequest(account_no=account_no, campaign_id=campaign_id)
        if since is not None:
            request.since.CopyFrom(_ts(since))
        r = self._call(self._stub.ListDunningAttempts, request, "ListDunningAttempts")
        assert isinstance(r, customer_pb2.ListDunningAttemptsResponse)
        if r.truncated:
            raise UpstreamFailed(f"attempt history of {account_no[-4:]} truncated: cannot count attempts")
        return [Attempt(a.campaign_id, a.account_no, a.attempt_no,
                        customer_pb2.DunningOutcome.Name(a.outcome).removeprefix("DUNNING_OUTCOME_"),
                        _from_ts(a.placed_at), _from_ts(a.outcome_at)) for a in r.attempts]

    def record(self, campaign_id: str, account_no: str, attempt_no: int, outcome: str, at: dt.datetime,
               detail: str = "") -> bool:
        """Records an attempt's outcome; True when it was already stored (a replay)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown dunning outcome {outcome!r}")
        r = self._call(self._stub.RecordDunningAttempt, customer_pb2.RecordDunningAttemptRequest(
            campaign_id=campaign_id, account_no=account_no, attempt_no=attempt_no,
            outcome=customer_pb2.DunningOutcome.Value(f"DUNNING_OUTCOME_{outcome}"), at=_ts(at),
            detail=detail[:128]), "RecordDunningAttempt")
        assert isinstance(r, customer_pb2.RecordDunningAttemptResponse)
        return bool(r.replayed)
