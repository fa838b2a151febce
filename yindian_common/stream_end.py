"""Whether a client stream that just ended was ended by its peer (a
half-close: "that was my last message") or by a cancellation.

grpcio's sync server cannot tell them apart where it ends the request
iterator: a cancelled call's pending read completes with "no more
messages", as a half-close does, and the cancellation is marked on the call
when grpcio's completion-queue thread handles it, a moment later (0.3 ms on
a quiet box; with other threads holding the interpreter lock, 1 ms after the
end is not enough one time in thirty). A Reconcile stream, whose trailer is
optional, must not be taken as the bank's whole day when it was cut short.

So `ended_by_peer` puts a barrier behind the end: it sends the response
headers (initial metadata, empty) and waits until grpcio has handled their
completion. On a cancelled call that completion is queued after the
cancellation's (the cancellation is already known to the core when the read
ended), and grpcio's one completion-queue thread handles them in order; so
once the headers' completion is handled, `is_active()` is the answer.
Sending the headers early changes nothing a client sees but their timing.

The barrier needs the headers unsent (true of a stream that answers only
after its requests end, as Reconcile does); otherwise `is_active()` alone is
asked. grpcio does not notify when the headers' completion is handled, so
the wait looks at the call's state every `POLL_S`, `wait_s` at most; not
knowing in time counts as cancelled (the caller refuses and the peer
retries).

Reads private state of grpcio's sync server (`_server._RPCState`), the
version pinned in pyproject.toml; tests/common/test_stream_end.py fails if
that changes.

Must never: answer "ended by its peer" for a cancelled call, or wait
without a bound."""
from __future__ import annotations

import grpc
from grpc import _server as grpc_server

from yindian_common.clock import monotonic_s

POLL_S = 0.0005       # how often the call's state is looked at while the headers' completion is pending
WAIT_MAX_S = 5.0      # the longest the barrier waits (a few milliseconds in practice)


def ended_by_peer(context: grpc.ServicerContext, wait_s: float = WAIT_MAX_S) -> bool:
    """True when the call whose request iterator just ended is still live
    after the barrier above: the peer half-closed its stream. False when it
    was cancelled, or when that could not be known within `wait_s`."""
    state = getattr(context, "_state", None)
    if state is None or not state.initial_metadata_allowed:
        return context.is_active()
    try:
        context.send_initial_metadata(())
    except grpc.RpcError:  # grpcio raises here once it knows the call was cancelled
        return False
    except ValueError:  # the headers went out meanwhile (another thread answered): no barrier
        return context.is_active()
    until_s = monotonic_s() + min(wait_s, WAIT_MAX_S)
    token = grpc_server._SEND_INITIAL_METADATA_TOKEN
    with state.condition:
        while token in state.due and state.client is not grpc_server._CANCELLED:
            left_s = until_s - monotonic_s()
            if left_s <= 0:
                return False
            state.condition.wait(min(POLL_S, left_s))
    return context.is_active()
