"""PROTOTYPE: the bridge's hot unary calls as coroutines on a grpc.aio server."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from bridge import journal as jn
from bridge.journal import Claim, Entry
from bridge.service import BillingServicer
from bridge.upstream import Answer, classify, OK, IN_DOUBT, NOT_SENT
from bridge.replicas import BILLING_SERVICE
from yindian.v1 import billing_pb2 as pb
from yindian_common import fields
from yindian_common.aio_rpc import AioUnaryClientMetrics
from yindian_common.clock import business_date
from yindian_common.crash_points import armed, crash_point
from yindian_common.status import guard

log = logging.getLogger("yindian.bridge.aio_edge")


class StatusSet(Exception):
    pass


class AioCallContext:
    __slots__ = ("_ctx",)

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._ctx.set_code(code)
        self._ctx.set_details(details)
        raise StatusSet

    def abort_with_status(self, status: Any) -> None:
        self._ctx.set_trailing_metadata(status.trailing_metadata)
        self.abort(status.code, status.details)

    def time_remaining(self) -> float | None:
        return self._ctx.time_remaining()  # type: ignore[no-any-return]

    def invocation_metadata(self) -> Any:
        return self._ctx.invocation_metadata()

    def auth_context(self) -> Any:
        return self._ctx.auth_context()

    def add_callback(self, fn: Any) -> bool:
        self._ctx.add_done_callback(lambda _c: fn())
        return True


class AioUpstream:
    def __init__(self, bctx: Any) -> None:
        self._replicas = bctx.replicas
        self._metadata = bctx.metadata()
        self._calls: dict[tuple[str, str], Any] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._metrics = {m: AioUnaryClientMetrics(f"/{BILLING_SERVICE}/{m}") for m in ("Pay", "Cancel")}

    def _multi(self, address: str, method: str) -> Any:
        key = (address, method)
        mc = self._calls.get(key)
        if mc is None:
            ch = self._channels.get(address)
            if ch is None:
                from yindian_common.server import channel_options
                ch = self._channels[address] = grpc.aio.insecure_channel(address, options=channel_options())
            req = pb.PayRequest if method == "Pay" else pb.CancelRequest
            resp = pb.PayResponse if method == "Pay" else pb.CancelResponse
            mc = self._calls[key] = ch.unary_unary(f"/{BILLING_SERVICE}/{method}",
                                                   request_serializer=req.SerializeToString,
                                                   response_deserializer=resp.FromString)
        return mc

    async def call(self, method: str, request: Any, timeout_s: float) -> Answer[Any]:
        replica = self._replicas.current()
        try:
            return Answer(OK, response=await self._metrics[method].call(
                self._multi(replica.address, method), request, timeout=timeout_s, metadata=self._metadata))
        except grpc.RpcError as exc:
            answer = classify(exc)
            if answer.kind in (IN_DOUBT, NOT_SENT) and answer.code == grpc.StatusCode.UNAVAILABLE:
                self._replicas.mark_down(replica, answer.message[:80])
            return answer


class AioBillingServicer(BillingServicer):
    def __init__(self, bctx: Any, resolver: Any) -> None:
        super().__init__(bctx, resolver)
        self._aio_up = AioUpstream(bctx)

    async def Pay(self, request: pb.PayRequest, ctx: Any) -> Any:  # type: ignore[override]
        context = AioCallContext(ctx)
        try:
            with guard(context, "Pay"):  # type: ignore[arg-type]
                from bridge.service import check_pay
                check_pay(request)
            now = self.bctx.clock.now()
            entry = Entry(kind=jn.PAY, serial=request.bank_serial, bank_id=self._bank_id, amount_fen=request.amount_fen,
                          state=jn.PENDING, business_date=business_date(self.bctx.clock), created_at=now,
                          updated_at=now, account_no=request.account_no, outlet_code=request.outlet_code,
                          teller_id=request.teller_id, channel=request.channel,
                          bank_balance_fen=request.bank_balance_fen if request.HasField("bank_balance_fen") else None,
                          caller=self.bctx.caller_of(context))  # type: ignore[arg-type]
            timeout_s = self._timeout(context)  # type: ignore[arg-type]
            claim, owned = self._claims.acquire(entry.key)
            if not owned:
                raise RuntimeError("prototype: duplicates not handled")
            deadline = time.monotonic() + timeout_s
            row = self._writer.journal_new(entry, claim)
            if not await row.wait_async(timeout_s):
                log.warning("event=journal_slow kind=%s serial=%s", entry.kind, entry.serial)
                return self._reply(entry, context)  # type: ignore[arg-type]
            if not row.inserted:
                raise RuntimeError("prototype: existing not handled")
            timeout_s = deadline - time.monotonic()
            crash_point("bridge.after_journal")
            answer = await self._aio_up.call("Pay", request, timeout_s)
            crash_point("bridge.after_answer")
            outcome = self._first_outcome(entry, answer)
            claim.result = outcome
            waited = outcome.state in (jn.DEFINITE_STATES | {jn.RETRYABLE})
            recording = self._writer.submit(outcome, claim, waited=waited)
            if not outcome.definite:
                self.resolver.wake()
            told = outcome
            if waited:
                remaining = ctx.time_remaining()
                if not await recording.wait_async(self._answer_wait_cap_s if remaining is None else max(0.0, remaining)):
                    from dataclasses import replace
                    told = replace(outcome, state=jn.SUSPECT)
            if answer.ok and told.state in (jn.POSTED, jn.CANCELLED):
                return answer.response
            return self._reply(told, context)  # type: ignore[arg-type]
        except StatusSet:
            return None
