"""The utility's mis_adapter replicas behind one link (`--upstream A --upstream B`):
one channel per replica, a health checker (grpc.health.v1, service
yindian.v1.BillingService) and the choice of the replica a call goes to.

- A call goes to the current replica while it is healthy; when it is not,
  to the first healthy one in the order given (sticky, so one replica takes
  the load and the other stands by warm).
- A replica is taken out at once when a call to it fails at the transport
  (UNAVAILABLE without the utility's ErrorInfo), and put back by the next
  health check that finds it SERVING; it is checked every
  `upstream_health_interval_s`.
- With no healthy replica, calls go to the current one: they fail as they
  would with one replica, and the in-doubt rules decide (bridge.upstream).

This module never retries a money-moving call: a pay whose answer was lost
on one replica is in doubt, and the resolver asks a healthy one."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from yindian.v1 import billing_pb2_grpc
from yindian_common.metrics import instrument_channel

log = logging.getLogger("yindian.bridge.replicas")

BILLING_SERVICE = "yindian.v1.BillingService"
REPLICAS_MAX = 16  # upstream addresses one bridge accepts


@dataclass
class Replica:
    address: str
    channel: grpc.Channel
    stub: billing_pb2_grpc.BillingServiceStub = field(init=False)
    health: health_pb2_grpc.HealthStub = field(init=False)
    # Unary calls without the metrics interceptor: bridge.upstream records their grpc_client_* itself.
    unary: billing_pb2_grpc.BillingServiceStub = field(init=False)
    healthy: bool = True  # optimistic at start: the first call or check tells

    def __post_init__(self) -> None:
        instrumented = instrument_channel(self.channel)
        self.stub = billing_pb2_grpc.BillingServiceStub(instrumented)
        self.health = health_pb2_grpc.HealthStub(instrumented)
        self.unary = billing_pb2_grpc.BillingServiceStub(self.channel)


class ReplicaSet:
    def __init__(self, addresses: Sequence[str], open_channel: Callable[[str], grpc.Channel], *,
                 health_interval_s: float, health_timeout_s: float) -> None:
        if not 1 <= len(addresses) <= REPLICAS_MAX:
            raise ValueError(f"between 1 and {REPLICAS_MAX} upstream replicas, got {len(addresses)}")
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"an upstream replica is named twice: {list(addresses)}")
        self.replicas = [Replica(a, open_channel(a)) for a in addresses]
        self._interval_s = health_interval_s
        self._timeout_s = health_timeout_s
        self._lock = threading.Lock()
        self._current = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- choosing --
    def current(self) -> Replica:
        with self._lock:
            cur = self.replicas[self._current]
            if cur.healthy:
                return cur
            for i, r in enumerate(self.replicas):
                if r.healthy:
                    log.warning("event=upstream_failover from=%s to=%s", cur.address, r.address)
                    self._current = i
                    return r
            return cur

    def others(self, replica: Replica) -> list[Replica]:
        """The healthy replicas other than `replica` (for a safe retry of a read)."""
        with self._lock:
            return [r for r in self.replicas if r is not replica and r.healthy]

    def mark_down(self, replica: Replica, why: str) -> None:
        with self._lock:
            was, replica.healthy = replica.healthy, False
        if was and len(self.replicas) > 1:
            log.warning("event=upstream_down replica=%s why=%s", replica.address, why)

    def healthy_count(self) -> int:
        with self._lock:
            return sum(r.healthy for r in self.replicas)

    # -- health checking --
    def check_once(self) -> None:
        for r in self.replicas:
            try:
                resp = r.health.Check(health_pb2.HealthCheckRequest(service=BILLING_SERVICE),
                                      timeout=self._timeout_s)
                ok = resp.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                ok = False
            with self._lock:
                was, r.healthy = r.healthy, ok
            if was != ok and len(self.replicas) > 1:
                log.warning("event=upstream_health replica=%s serving=%s", r.address, ok)

    def start(self) -> None:
        if len(self.replicas) < 2 or self._thread is not None:
            return  # one replica: nothing to choose, calls fail as they always did

        def loop() -> None:
            while not self._stop.wait(self._interval_s):
                self.check_once()

        self.check_once()
        self._thread = threading.Thread(target=loop, name="upstream-health", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._timeout_s + self._interval_s)
        for r in self.replicas:
            r.channel.close()
