"""The bank core's request stream as the request iterator of an upstream
call (Reconcile, BillFeed).

Ending the upstream request iterator is a half-close: it tells mis_adapter
"that was the bank's last message". For Reconcile, whose trailer is
optional, that means "reconcile the day with the records you have". So the
relay ends it only when the bank core really ended its stream; in every
other case it cancels the upstream call, and nothing is half-closed:
- a message refused while being read (undecodable bytes:
  yindian_common.wire_guard raises InvalidField): the refusal is kept for
  the handler to answer the bank core with (never grpcio's client-side
  UNKNOWN "Exception iterating requests!" on the link);
- the bank core's call cancelled or timed out: grpcio raises on the next
  read, or ends the iterator as if the bank had finished (the cancellation
  is marked a moment later), which yindian_common.stream_end tells apart.
The refusal can happen before the handler has the call object (grpcio reads
the first requests while the call is being made): the relay then waits for
it, `CALL_WAIT_S` at most, and failing that raises, which makes grpcio
cancel the call (never half-close it)."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

from yindian_common.errors import YinDianError
from yindian_common.stream_end import ended_by_peer

CALL_WAIT_S = 5.0  # for the handler to hand over the call it is making (microseconds in practice)


class RequestRelay:
    def __init__(self, context: grpc.ServicerContext | None = None) -> None:
        self.refused: YinDianError | None = None
        self._context = context  # the bank core's call, when an early end must be told from a real one
        self._call: grpc.Future | None = None
        self._placed = threading.Event()

    @property
    def call(self) -> grpc.Future | None:
        return self._call

    @call.setter
    def call(self, call: grpc.Future) -> None:
        self._call = call
        self._placed.set()

    def forward(self, requests: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from requests
        except grpc.RpcError:
            self._cancel()  # the bank core went away mid-stream
            return
        except YinDianError as exc:
            self.refused = exc
            self._cancel()
            return
        if self._context is not None and not ended_by_peer(self._context):
            self._cancel()  # a cancellation that ended the iterator like a finished stream

    def _cancel(self) -> None:
        if not self._placed.wait(CALL_WAIT_S):
            raise RuntimeError("the upstream call was not handed to the relay; grpcio cancels it")
        assert self._call is not None
        self._call.cancel()
