"""A method's own thread pool in grpcio's thread-pool server. grpcio runs a handler on
`handler.experimental_thread_pool` when the handler function carries one, else on the server's
pool. `on_pool` gives a handler its pool; every wrapper the server puts around handlers
(metrics, the malformed-request guard, admission) carries the inner handler's pool over with
`same_pool`, so the pool reaches the outermost handler, the one grpcio looks at.

Why: mis_adapter's money-moving calls block on its database pool. On the server's 64 threads,
32 pays in flight meant 16 threads holding a connection and 16 asleep in the pool's queue, each
woken by a check-in: a thread hand-off per pay on top of gRPC's own. On a pool of as many
threads as connections, a finished pay's thread takes the next call itself.

`CallPool` is also every server's own pool (yindian_common.server.GrpcServer, since session 16): each
unary-unary call is handed to a thread once, with its request; streaming calls queue as grpcio queues them."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

from grpc import _server as _grpc_server  # private: CallPool's one hand-off per unary call (below)
from grpc._cython import cygrpc

POOL_ATTR = "experimental_thread_pool"  # the attribute grpcio reads (grpc._server._select_thread_pool_for_behavior)
F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


def on_pool(behavior: Callable[..., Any], pool: Executor) -> Callable[..., Any]:
    """`behavior` (a servicer method) run on `pool` instead of the server's threads."""
    def handler(*args: Any) -> Any:
        return behavior(*args)
    setattr(handler, POOL_ATTR, pool)
    handler.__name__ = getattr(behavior, "__name__", "handler")
    return handler


def same_pool(outer: F, inner: Callable[..., Any] | None) -> F:
    """`outer`, a wrapper of `inner`, on `inner`'s pool if it has one."""
    pool = getattr(inner, POOL_ATTR, None)
    if pool is not None:
        setattr(outer, POOL_ATTR, pool)
    return outer


class _Call:
    """One submitted call: grpcio only adds a done callback to what `submit` returns (to count the
    server's calls in progress), so this is all of a Future it gets."""

    __slots__ = ("fn", "args", "kwargs", "callbacks", "lock")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.callbacks: list[Callable[[Any], Any]] | None = []  # None: done
        self.lock = threading.Lock()

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        with self.lock:
            callbacks = self.callbacks
            if callbacks is not None:
                callbacks.append(fn)
                return
        fn(self)

    def done(self) -> bool:
        return self.callbacks is None

    def finish(self) -> None:
        with self.lock:
            callbacks, self.callbacks = self.callbacks, None
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - one callback's failure must not stop the others or the worker
                log.exception("a done callback of a pooled call raised")

    def run(self) -> None:
        try:
            self.fn(*self.args, **self.kwargs)
        except BaseException:  # grpcio's behaviours answer their own errors: this is a bug, logged
            log.exception("a pooled call raised")
        finally:
            self.finish()


class CallPool(ThreadPoolExecutor):
    """A thread pool for grpcio's server (which takes only a ThreadPoolExecutor, and only submits to it
    and adds a done callback) without concurrent.futures' bookkeeping per call: no Future with its
    Condition and RLock, no work item, no idle semaphore taken and given back, no set_result
    notify_all. Under bench-ratio these were a fifth of mis_adapter's GIL samples on the money pool.
    At most `max_workers` threads, each started when a call finds no idle one; calls queue in order.
    A unary-unary call is queued once its request message has arrived (_receive_first: one wake-up of
    a worker per call, not two). `shutdown(cancel_futures=True)` drops the calls not started (their
    done callbacks run), and ends so any whose message arrives later."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._idle = 0  # workers waiting for a call and not yet promised one (under _state_lock)
        self._state_lock = threading.Lock()
        self._stopped = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        call = _Call(fn, args, kwargs)
        with self._state_lock:
            if self._stopped:
                raise RuntimeError("cannot schedule new calls after shutdown")
        if (not kwargs and len(args) == _UNARY_ARGS and args[0] is _UNARY_IN_POOL
                and getattr(args[4], "__code__", None) is _UNARY_REQUEST_CODE and _receive_first(self, call)):
            return call  # queued when its request message has arrived
        self._queue(call)
        return call

    def _queue(self, call: _Call) -> None:
        """`call` to an idle worker, to a new one if fewer than max_workers run, else queued in order."""
        with self._state_lock:
            stopped = self._stopped
            if stopped:
                start = False
            elif self._idle:
                self._idle -= 1
                start = False
            else:
                start = len(self._workers) < self._max_workers
            if start:
                worker = threading.Thread(target=self._work, name=f"{self._thread_name_prefix}_{len(self._workers)}",
                                          daemon=True)
                self._workers.append(worker)
        if stopped:  # a call whose message arrived after shutdown: ended without running, as a dropped one
            call.finish()
            return
        self._calls.put(call)
        if start:
            worker.start()

    def _work(self) -> None:
        get, lock = self._calls.get, self._state_lock
        while True:
            call = get()
            if call is None:
                return
            call.run()
            del call
            with lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._state_lock:
            self._stopped = True
            workers = list(self._workers)
        if cancel_futures:
            while True:
                try:
                    dropped = self._calls.get_nowait()
                except queue.Empty:
                    break
                if dropped is not None:
                    dropped.finish()
        for _ in workers:
            self._calls.put(None)
        if wait:
            for w in workers:
                w.join()


# ---- one hand-off per unary call ----
# grpcio's thread-pool server hands a unary-unary call to the pool as soon as the call arrives
# (grpc._server._handle_unary_unary); the pool's thread then asks for the request message and sleeps on
# the call's Condition until the serving thread, which receives it, wakes it: two wake-ups of the
# worker per call, each a futex wake and a GIL hand-off. CallPool instead asks for the message itself,
# on the serving thread in submit (grpcio's own receive_message callback, which stores it in the call's
# state), and queues the call only when the message is there: one wake-up. The worker takes the stored
# message (or answers as grpcio's unary_request would when there is none). This reads grpcio's private
# server module (grpcio pinned in pyproject.toml); tests/common/test_rpc_pools.py checks that a unary
# call on a CallPool takes this path with the installed grpcio, so an upgrade that changes it fails there
# (a call whose arguments are not recognised takes grpcio's own path).
_UNARY_IN_POOL = _grpc_server._unary_response_in_pool
# A stream-unary call goes to the same function with a thunk giving its request iterator: only a unary-unary
# call's thunk is grpcio's unary_request closure (made here without running it, to compare code objects).
_UNARY_REQUEST_CODE = _grpc_server._unary_request(None, None, None).__code__  # type: ignore[arg-type]
# submit(context.run, _unary_response_in_pool, rpc_event, state, behavior, argument_thunk, deserializer, serializer)
_UNARY_ARGS = 7
_RECEIVE_MESSAGE_TOKEN = _grpc_server._RECEIVE_MESSAGE_TOKEN
_EMPTY_FLAGS = 0
_CLOSED, _CANCELLED = _grpc_server._CLOSED, _grpc_server._CANCELLED
_CALL_OK = cygrpc.CallError.ok
received_first = 0  # calls that took the one hand-off path (for the test that it is taken)


def _receive_first(pool: CallPool, call: _Call) -> bool:
    """Starts receiving `call`'s request message with a callback that stores it and queues `call` on
    `pool`, and gives the call a thunk that takes the stored message. False (nothing started) when the
    call is no longer active or the receive could not be started: grpcio's own path then."""
    global received_first
    in_pool, rpc_event, state, behavior, _thunk, deserializer, serializer = call.args
    receive = _grpc_server._receive_message(state, rpc_event.call, deserializer)

    def on_message(event: Any) -> Any:
        finished = receive(event)  # stores the message (or the client's end) in state; grpcio's bookkeeping
        pool._queue(call)
        return finished

    given = call.args
    call.args = (in_pool, rpc_event, state, behavior, _stored_request(rpc_event, state), deserializer, serializer)
    with state.condition:  # reentrant: grpcio's serving thread holds it while it submits
        if not _grpc_server._is_rpc_state_active(state):
            call.args = given
            return False
        error = rpc_event.call.start_server_batch((cygrpc.ReceiveMessageOperation(_EMPTY_FLAGS),), on_message)
        if error not in (None, _CALL_OK):
            call.args = given
            return False
        state.due.add(_RECEIVE_MESSAGE_TOKEN)
    received_first += 1
    return True


def _stored_request(rpc_event: Any, state: Any) -> Callable[[], Any]:
    """grpcio's unary_request once the receive ended: the message, or None (the call answered
    UNIMPLEMENTED when the client sent none, as grpcio answers; nothing when it was cancelled or aborted)."""
    def stored_request() -> Any:
        with state.condition:
            request = state.request
            if request is not None:
                state.request = None
                return request
            if state.client is _CLOSED and not state.statused:
                details = f'"{rpc_event.call_details.method}" requires exactly one request message.'
                _grpc_server._abort(state, rpc_event.call, cygrpc.StatusCode.unimplemented, details.encode())
            return None
    return stored_request
