"""What every part of the bridge shares, built once in `serve`."""
from __future__ import annotations

import datetime as dt

import grpc
from sqlalchemy.engine import Engine

from bridge.journal import Claims, Journal, JournalWriter
from bridge.replicas import ReplicaSet
from bridge.settings import BridgeSettings
from bridge.upstream import Upstream
from yindian.v1 import billing_pb2_grpc
from yindian_common import identity
from yindian_common.clock import Clock
from yindian_common.identity import BANK_ID_METADATA

FLUSH_TIMEOUT_S = 10.0


class BridgeContext:
    """The bridge's shared state, handed to its servicer and to the modules it
    delegates to (bridge.recon, bridge.feed_relay):

    - `settings`: the frozen BridgeSettings of the process
    - `clock`: the injectable clock (business dates, timestamps)
    - `engine`: the journal database's SQLAlchemy engine
    - `journal`: the journal repository (bridge.journal.Journal)
    - `replicas`: mis_adapter's replicas, one instrumented channel each (bridge.replicas)
    - `stub`: a BillingServiceStub on the current healthy replica (a property)
    - `metadata()`: identity metadata to pass on every upstream call
      (`x-yindian-bank-id` in plain-text mode; empty with mTLS)
    - `deadline_for(context)`: the timeout, in seconds, for an upstream call made
      on behalf of `context`: its remaining time minus a margin, capped by
      `upstream_deadline_cap_s` (the cap when the caller set no deadline)
    - `admit(context, rpc)` / `caller_of(context)`: who is calling, refused
      (PERMISSION_DENIED, audited) unless it is this bank (`bank_id`) or a
      name of `allow_client`: under mTLS the certificate, in plain text the
      x-yindian-bank-id metadata (this bank when none is sent)
    - `in_doubt_count(settlement_date)`: journaled Pay/Cancel rows of that
      business date whose outcome is not yet definite; reconciliation refuses
      a day while this is not zero
    """

    def __init__(self, *, settings: BridgeSettings, clock: Clock, engine: Engine, journal: Journal,
                 writer: JournalWriter, claims: Claims, replicas: ReplicaSet) -> None:
        self.settings = settings
        self.clock = clock
        self.engine = engine
        self.journal = journal
        self.writer = writer
        self.claims = claims
        self.replicas = replicas
        self._metadata: tuple[tuple[str, str], ...] = (
            ((BANK_ID_METADATA, settings.bank_id),) if settings.tls() is None else ())
        self.upstream = Upstream(replicas, self._metadata)
        self._tls = settings.tls() is not None
        self._allowed = frozenset({settings.bank_id, *settings.allow_client})

    @property
    def stub(self) -> billing_pb2_grpc.BillingServiceStub:
        return self.upstream.stub

    def admit(self, context: grpc.ServicerContext, rpc: str) -> identity.Caller:
        return identity.admit_client(context, rpc, tls=self._tls, allowed=self._allowed,
                                     default=self.settings.bank_id)

    def caller_of(self, context: grpc.ServicerContext) -> str:
        """The admitted caller's identity (the admission interceptor refused everyone else)."""
        return self.admit(context, "").name

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def deadline_for(self, context: grpc.ServicerContext) -> float:
        cap_s = self.settings.upstream_deadline_cap_s
        remaining = context.time_remaining()
        if remaining is None:
            return cap_s
        return max(0.0, min(cap_s, remaining - self.settings.upstream_deadline_margin_s))

    def expedite_retryable(self, settlement_date: dt.date) -> int:
        """The day's RETRYABLE pays are probed at once (see Journal.expedite_retryable)."""
        return self.journal.expedite_retryable(settlement_date)

    def in_doubt_count(self, settlement_date: dt.date | str) -> int:
        day = dt.date.fromisoformat(settlement_date) if isinstance(settlement_date, str) else settlement_date
        # Outcomes already known but not yet recorded are not in doubt: record them first.
        self.writer.flush(FLUSH_TIMEOUT_S)
        return self.journal.in_doubt_count(day)
