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
unchanged, with its error details.

With several mis_adapter replicas (`--upstream A --upstream B`) the stream
moves to a surviving replica when its replica dies (the link fails without
the utility's ErrorInfo): the bridge resubscribes there after the stored
cursor (Subscribe without a resume point), retrying while the dead replica's
lease lapses (FEED_ALREADY_ACTIVE), up to `feed_failover_max_s`. The bank
core's stream stays open; it may see notices again, which it answers from
its stored results (the cursor covers only results that reached the
utility, so nothing is lost and nothing is debited twice). A message the
reader of a finished upstream stream took is given back to the next one. After a move,
a result for a notice the new upstream stream has not delivered (yet) is
not forwarded: the notice is redelivered and answered again. The bank
core's messages pass through a queue of FEED_RELAY_QUEUE_MAX (back-pressure
beyond it), so that successive upstream calls can share its stream."""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from bridge.context import BridgeContext
from bridge.request_relay import RequestRelay
from bridge.upstream import IN_DOUBT, classify
from yindian.v1 import billing_pb2 as pb
from yindian_common.errors import YinDianError
from yindian_common.handoff import put_until_stopped
from yindian_common.status import abort, trailing_details

log = logging.getLogger("bridge.feed")


def _timeout_of(context: grpc.ServicerContext) -> float | None:
    # A feed is a long-lived stream: its liveness comes from heartbeats and
    # keepalive, so it carries the bank core's deadline only if it set one.
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 10 * 365 * 86400 else None


def bill_feed(bctx: BridgeContext, request_iterator: Iterator[pb.BillFeedRequest],
              context: grpc.ServicerContext) -> Iterator[pb.BillFeedResponse]:
    if len(bctx.replicas.replicas) > 1:
        yield from _bill_feed_replicas(bctx, request_iterator, context)
        return
    timeout = _timeout_of(context)
    relay = RequestRelay(context)
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


# ---- several replicas: the stream moves to a survivor ----
FEED_RELAY_QUEUE_MAX = 64        # bank-core messages waiting for the current upstream stream
_END = None                      # the bank core ended its stream


class _Attempt:
    """One upstream stream: the seqs it delivered (a contiguous range) and whether it is over."""

    def __init__(self, moved: bool) -> None:
        self.moved = moved         # after a move: forward only results for seqs delivered here
        self.low: int | None = None
        self.high = 0
        self.over = threading.Event()

    def saw(self, msg: pb.BillFeedResponse) -> None:
        if msg.WhichOneof("body") == "notices" and msg.notices.notices:
            if self.low is None:
                self.low = msg.notices.notices[0].seq
            self.high = max(self.high, msg.notices.notices[-1].seq)

    def keep(self, req: pb.BillFeedRequest) -> pb.BillFeedRequest | None:
        if not self.moved or req.WhichOneof("body") != "results":
            return req
        low = self.low
        ok = [r for r in req.results.results if low is not None and low <= r.seq <= self.high]
        if len(ok) != len(req.results.results):
            log.info("event=feed_relay_results_held dropped=%d", len(req.results.results) - len(ok))
        return pb.BillFeedRequest(results=pb.DebitResultBatch(results=ok)) if ok else None


class _Inbox:
    """The bank core's messages for whichever upstream stream is current: a bounded
    queue filled by the pump, and the messages a finished stream's reader took
    but could not send (given back, read first by the next stream)."""

    def __init__(self) -> None:
        self.q: queue.Queue[pb.BillFeedRequest | None] = queue.Queue(maxsize=FEED_RELAY_QUEUE_MAX)
        self._carry: collections.deque[pb.BillFeedRequest | None] = collections.deque()
        self.refused: YinDianError | None = None  # a malformed bank-core message: the stream ends on it
        self.upstream: grpc.Future | None = None   # the current upstream stream, cancelled on a refusal

    def take(self, timeout_s: float) -> tuple[bool, pb.BillFeedRequest | None]:
        try:
            return True, self._carry.popleft()
        except IndexError:
            pass
        try:
            return True, self.q.get(timeout=timeout_s)
        except queue.Empty:
            return False, None

    def give_back(self, item: pb.BillFeedRequest | None) -> None:
        self._carry.appendleft(item)


def _pump(request_iterator: Iterator[pb.BillFeedRequest], inbox: _Inbox, stop: threading.Event) -> None:
    """Reads the bank core's stream into the inbox (blocking while it is full), then _END."""
    try:
        for req in request_iterator:
            if not put_until_stopped(inbox.q, req, stop):
                return
    except grpc.RpcError:
        pass  # the bank core went away
    except YinDianError as exc:  # a malformed message (wire_guard): the bank core is answered its refusal
        inbox.refused = exc
        if inbox.upstream is not None:
            inbox.upstream.cancel()  # the relay loop sees the call end and answers the refusal
    put_until_stopped(inbox.q, _END, stop)




def _requests(first: pb.BillFeedRequest, inbox: _Inbox, attempt: _Attempt) -> Iterator[pb.BillFeedRequest]:
    yield first
    while not attempt.over.is_set():
        got, req = inbox.take(0.2)
        if not got:
            continue
        if req is _END or attempt.over.is_set():
            inbox.give_back(req)  # the bank core's end, or a message for the next stream
            return
        kept = attempt.keep(req)
        if kept is not None:
            yield kept


def _bill_feed_replicas(bctx: BridgeContext, request_iterator: Iterator[pb.BillFeedRequest],
                        context: grpc.ServicerContext) -> Iterator[pb.BillFeedResponse]:
    s = bctx.settings
    try:
        first = next(request_iterator)
    except (StopIteration, grpc.RpcError):
        return
    inbox = _Inbox()
    stop = threading.Event()
    context.add_callback(stop.set)
    threading.Thread(target=_pump, args=(request_iterator, inbox, stop), name="feed-relay-pump",
                     daemon=True).start()
    moved = False                   # the stream has moved at least once: filter results (see _Attempt)
    lost_at: float | None = None    # when the current replica was lost, until a survivor answers
    try:
        while context.is_active():
            replica = bctx.replicas.current()
            attempt = _Attempt(moved=moved)
            sub = pb.BillFeedRequest(subscribe=pb.Subscribe()) if moved else first
            call = replica.stub.BillFeed(_requests(sub, inbox, attempt), metadata=bctx.metadata(),
                                         timeout=_timeout_of(context))
            context.add_callback(call.cancel)
            inbox.upstream = call
            if inbox.refused is not None:  # refused before this stream opened
                call.cancel()
            log.info("event=feed_relay_open replica=%s moved=%s", replica.address, moved)
            try:
                for msg in call:
                    if lost_at is not None:
                        log.warning("event=feed_relay_moved replica=%s after_s=%.1f", replica.address,
                                    time.monotonic() - lost_at)
                        lost_at = None
                    attempt.saw(msg)
                    yield msg
                if inbox.refused is not None:
                    abort(context, inbox.refused)
                return  # the utility ended the stream normally (the bank core closed its side)
            except grpc.RpcError as exc:
                if inbox.refused is not None:
                    abort(context, inbox.refused)
                if not context.is_active() or stop.is_set():
                    return
                answer = classify(exc)
                lease_held = answer.code == grpc.StatusCode.ABORTED and answer.reason() == "FEED_ALREADY_ACTIVE"
                if answer.kind == IN_DOUBT and answer.code == grpc.StatusCode.UNAVAILABLE:
                    bctx.replicas.mark_down(replica, "feed stream lost")
                elif not (moved and lease_held):
                    _relay_end(exc, context)
                    return
                moved = True
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.warning("event=feed_relay_lost replica=%s code=%s", replica.address, answer.code.name)
                if time.monotonic() - lost_at > s.feed_failover_max_s:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "no mis_adapter replica took over the bill feed")
                stop.wait(s.feed_failover_retry_s)
            finally:
                attempt.over.set()
                call.cancel()
    finally:
        stop.set()


def _relay_end(exc: grpc.RpcError, context: grpc.ServicerContext) -> None:
    code = exc.code()  # type: ignore[attr-defined]
    log.info("event=feed_relay_upstream_ended code=%s", code.name if code else "-")
    details = trailing_details(exc)
    if details:
        context.set_trailing_metadata(details)
    context.abort(code or grpc.StatusCode.UNAVAILABLE, exc.details() or "upstream feed ended")  # type: ignore[attr-defined]
