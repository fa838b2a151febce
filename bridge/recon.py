"""The bridge's side of BillingService.Reconcile: the bank core streams its
ledger for a settlement day (header, record batches, optional trailer); the
bridge relays it to mis_adapter over the link and relays the discrepancy
lines and the summary back.

In-doubt items (DESIGN.md Money semantics 3 and 8): a Pay or Cancel the
bridge journaled for that day whose outcome it does not know yet could be
counted one-sided by mistake (the bank believes POSTED what the utility never
applied, or the other way round). So the bridge first gives its resolver a
bounded time to settle them (`IN_DOUBT_WAIT_S`, and at most half the
caller's remaining deadline), then refuses the day with
FAILED_PRECONDITION, reason DAY_IN_DOUBT, naming how many are still in doubt;
the bank retries later. Nothing is forwarded while anything is in doubt.

Must never: forward a day with in-doubt items, change the records, or end
the upstream stream unless the bank core ended its own (bridge.request_relay)."""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from bridge.context import BridgeContext
from bridge.request_relay import RequestRelay
from bridge.upstream import DEFINITE, classify, relay
from yindian.v1 import billing_pb2 as pb
from yindian_common import fields
from yindian_common.clock import monotonic_s
from yindian_common.db import watched_until_deadline
from yindian_common.errors import InvalidField, Precondition, Unavailable
from yindian_common.status import guard

log = logging.getLogger("yindian.bridge.recon")

IN_DOUBT_WAIT_S = 10.0            # the resolver's chance to settle the day before we refuse
IN_DOUBT_WAIT_SHARE = 0.5         # at most this share of the caller's remaining time is spent waiting
IN_DOUBT_POLL_S = 0.25            # how often the in-doubt count is looked at meanwhile
RECON_UPSTREAM_DEADLINE_S = 900.0  # a whole day's reconciliation (1M records) on the link


def wait_until_settled(bctx: BridgeContext, day: dt.date, wait_s: float = IN_DOUBT_WAIT_S,
                       poll_s: float = IN_DOUBT_POLL_S) -> None:
    """Returns once nothing of `day` is in doubt; raises DAY_IN_DOUBT after `wait_s`."""
    deadline_s = monotonic_s() + wait_s
    pause = threading.Event()
    bctx.expedite_retryable(day)
    while True:
        n = bctx.in_doubt_count(day)
        if n == 0:
            return
        if monotonic_s() >= deadline_s:
            raise Precondition(f"{n} payments or cancels of {day} are still in doubt at the bridge; "
                               "reconcile again once they are resolved", reason="DAY_IN_DOUBT")
        pause.wait(poll_s)


def reconcile(bctx: BridgeContext, request_iterator: Iterator[Any], context: grpc.ServicerContext
              ) -> Iterator[pb.ReconcileResponse]:
    with guard(context, "Reconcile", database="bridge journal database"):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("body") != "header":
            raise InvalidField("header", "the first message must be the header with the settlement date")
        day = fields.iso_date(first.header.settlement_date, "header.settlement_date")
        remaining = context.time_remaining()
        wait_s = IN_DOUBT_WAIT_S if remaining is None else min(IN_DOUBT_WAIT_S, remaining * IN_DOUBT_WAIT_SHARE)
        # The journal's reads meanwhile are given up by the caller's deadline on a dead link (db_watch).
        with watched_until_deadline(remaining):
            wait_until_settled(bctx, day, wait_s)
        timeout_s = RECON_UPSTREAM_DEADLINE_S
        if remaining is not None:
            timeout_s = min(timeout_s, max(0.0, remaining - bctx.settings.upstream_deadline_margin_s))
        requests = RequestRelay(context)
        call = requests.call = bctx.stub.Reconcile(requests.forward(itertools.chain([first], request_iterator)),
                                                metadata=bctx.metadata(), timeout=timeout_s)
        context.add_callback(call.cancel)  # the bank core gone while the MIS closes: it must not commit (see relay)
        try:
            yield from call
        except grpc.RpcError as exc:
            if requests.refused is not None:
                raise requests.refused from None
            answer = classify(exc)
            if answer.kind == DEFINITE:
                log.info("event=reconcile_refused_upstream day=%s code=%s", day, answer.code.name)
                relay(context, answer)
            raise Unavailable(f"reconciliation of {day} did not complete on the link ({answer.code.name}); "
                              "reconcile again: a finished day answers with its stored result",
                              reason="LINK_INTERRUPTED") from exc
