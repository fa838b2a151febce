"""Support for the feed tests (no tests here): a raw BillFeed subscriber that
sends exactly what a test says and hands back what the server sent, with bounded waits."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import grpc

from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc

DEBITED = pb.DEBIT_OUTCOME_DEBITED
INSUFFICIENT = pb.DEBIT_OUTCOME_INSUFFICIENT_FUNDS
MESSAGES_MAX = 100_000


class RawFeed:
    def __init__(self, stub: billing_pb2_grpc.BillingServiceStub, bank: str = "ICBC", resume: int | None = None,
                 timeout_s: float = 120.0) -> None:
        self._q: queue.Queue[pb.BillFeedRequest | None] = queue.Queue()
        sub = pb.Subscribe() if resume is None else pb.Subscribe(resume_after_seq=resume)
        self._q.put(pb.BillFeedRequest(subscribe=sub))
        self.call = stub.BillFeed(iter(self._q.get, None), metadata=[("x-yindian-bank-id", bank)],
                                  timeout=timeout_s)
        self.cursor = -1
        self.heartbeats = 0

    def _next(self) -> pb.BillFeedResponse:
        return next(self.call)

    def send(self, results: Sequence[pb.DebitResult]) -> None:
        self._q.put(pb.BillFeedRequest(results=pb.DebitResultBatch(results=list(results))))

    def send_raw(self, req: pb.BillFeedRequest) -> None:
        self._q.put(req)

    def notices(self, n: int) -> list[pb.BillNotice]:
        """The next n notices (skipping heartbeats)."""
        out: list[pb.BillNotice] = []
        for _ in range(MESSAGES_MAX):
            if len(out) >= n:
                break
            msg = self._next()
            if msg.WhichOneof("body") == "notices":
                out.extend(msg.notices.notices)
            else:
                self.heartbeats += 1
                self.cursor = msg.heartbeat.acked_through_seq
        return out

    def next_message(self) -> pb.BillFeedResponse:
        msg = self._next()
        if msg.WhichOneof("body") == "heartbeat":
            self.heartbeats += 1
            self.cursor = msg.heartbeat.acked_through_seq
        return msg

    def until_cursor(self, seq: int) -> list[pb.BillNotice]:
        """Reads until a heartbeat says the cursor reached `seq`; returns notices seen meanwhile."""
        seen: list[pb.BillNotice] = []
        for _ in range(MESSAGES_MAX):
            if self.cursor >= seq:
                return seen
            msg = self.next_message()
            if msg.WhichOneof("body") == "notices":
                seen.extend(msg.notices.notices)
        raise AssertionError("cursor never reached")

    def error(self) -> grpc.RpcError:
        """Reads until the server ends the stream with an error, and returns it."""
        try:
            for _ in range(MESSAGES_MAX):
                self._next()
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("stream did not end")

    def close(self) -> None:
        self._q.put(None)
        self.call.cancel()


def debited(n: pb.BillNotice, serial: str | None = None) -> pb.DebitResult:
    return pb.DebitResult(seq=n.seq, outcome=DEBITED, bank_serial=serial or f"AD-{n.seq}", amount_fen=n.amount_fen)


def insufficient(n: pb.BillNotice) -> pb.DebitResult:
    return pb.DebitResult(seq=n.seq, outcome=INSUFFICIENT, amount_fen=n.amount_fen)


def iter_all(feed: RawFeed) -> Iterator[pb.BillFeedResponse]:
    for _ in range(MESSAGES_MAX):
        yield feed.next_message()


def subscribe(stub: billing_pb2_grpc.BillingServiceStub, bank: str = "ICBC", resume: int | None = None,
              attempts: int = 400) -> RawFeed:
    """Subscribes once the bank's previous stream has released its lease (its
    end is noticed by the server asynchronously after a client cancels).
    The first message of every stream is a heartbeat carrying the cursor."""
    for _ in range(attempts):
        f = RawFeed(stub, bank=bank, resume=resume)
        try:
            assert f.next_message().WhichOneof("body") == "heartbeat"
            return f
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            threading.Event().wait(0.05)
    raise AssertionError("the bank's previous stream never ended")
