"""BillFeed through the bridge: the bank core's stream is relayed to
mis_adapter's, message for message, with the bank's identity stamped on
the upstream call. BridgeServicer.BillFeed delegates here.

What it must never do: acknowledge upstream anything the bank core has not
sent. Results travel upstream only as the bank core sends them (the bank
core commits each debit before answering), so a crash of the bridge at any
point loses nothing: the cursor at mis_adapter covers only results that
reached it, and the rest is redelivered on resubscription.

Memory stays bounded: nothing is buffered here. Upstream notices are read
only as fast as the bank core's stream accepts them (gRPC flow control),
and upstream results are read from the bank core only as fast as the
link accepts them. The end of either stream ends the other; an upstream
status (e.g. ABORTED / FEED_ALREADY_ACTIVE) is passed to the bank core
unchanged, with its error details."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from bridge.context import BridgeContext
from bridge.request_relay import RequestRelay
from yindian.v1 import billing_pb2 as pb
from yindian_common.status import abort, trailing_details

log = logging.getLogger("bridge.feed")


def bill_feed(bctx: BridgeContext, request_iterator: Iterator[pb.BillFeedRequest],
              context: grpc.ServicerContext) -> Iterator[pb.BillFeedResponse]:
    remaining = context.time_remaining()
    # A feed is a long-lived stream: its liveness comes from heartbeats and
    # keepalive, so it carries the bank core's deadline only if it set one.
    timeout = remaining if remaining is not None and remaining < 10 * 365 * 86400 else None
    relay = RequestRelay()
    call = relay.call = bctx.stub.BillFeed(relay.forward(request_iterator), metadata=bctx.metadata(), timeout=timeout)
    context.add_callback(call.cancel)
    log.info("event=feed_relay_open")
    try:
        yield from call
    except grpc.RpcError as exc:
        if relay.refused is not None:
            abort(context, relay.refused)
        if not context.is_active():
            return
        code = exc.code()
        log.info("event=feed_relay_upstream_ended code=%s", code.name if code else "-")
        details = trailing_details(exc)
        if details:
            context.set_trailing_metadata(details)
        context.abort(code or grpc.StatusCode.UNAVAILABLE, exc.details() or "upstream feed ended")
    finally:
        call.cancel()
