"""A method's own thread pool in grpcio's thread-pool server. grpcio runs a handler on
`handler.experimental_thread_pool` when the handler function carries one, else on the server's
pool. `on_pool` gives a handler its pool; every wrapper the server puts around handlers
(metrics, the malformed-request guard, admission) carries the inner handler's pool over with
`same_pool`, so the pool reaches the outermost handler, the one grpcio looks at.

Why: mis_adapter's money-moving calls block on its database pool. On the server's 64 threads,
32 pays in flight meant 16 threads holding a connection and 16 asleep in the pool's queue, each
woken by a check-in: a thread hand-off per pay on top of gRPC's own. On a pool of as many
threads as connections, a finished pay's thread takes the next call itself."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

POOL_ATTR = "experimental_thread_pool"  # the attribute grpcio reads (grpc._server._select_thread_pool_for_behavior)
F = TypeVar("F", bound=Callable[..., Any])


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
