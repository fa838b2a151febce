"""The bank front end's scrape-time gauges, read from its journal: pays in
doubt (SUSPECT) and the store-and-forward reversal queue (REVERSING pays and
SUSPECT cancels awaiting resend), each with its depth and the age of its
oldest entry, per bank. Connection-pool use of the journal comes with them.

One aggregate over the journal's (state, next_attempt_ms) index per read,
cached for `CollectorLimits.refresh_s` and bounded by a statement timeout on
a dedicated connection. Nothing here writes, and no label carries a serial."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.engine import Engine

from bridge import journal as jn
from bridge.journal.schema import in_states
from yindian_common import business_metrics as bm
from yindian_common.clock import Clock

__all__ = ["BridgeCollector", "register"]

_j = jn.requests

IN_DOUBT_BY_BANK = (
    sa.select(_j.c.bank_id, _j.c.kind, _j.c.state, sa.func.count(), sa.func.min(_j.c.created_at))
    .where(in_states(jn.SUSPECT, jn.REVERSING))
    .group_by(_j.c.bank_id, _j.c.kind, _j.c.state)
)

SUSPECT = "yindian_suspect_payments"
SUSPECT_AGE = "yindian_suspect_payments_oldest_age_seconds"
QUEUE_DEPTH = "yindian_reversal_queue_depth"
QUEUE_AGE = "yindian_reversal_queue_oldest_age_seconds"


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite and MariaDB hand back naive datetimes; the journal stores UTC instants.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _in_reversal_queue(kind: str, state: str) -> bool:
    """Reversals the bridge must deliver: tombstoning cancels of never-posted pays, and cancels to resend."""
    return (kind == jn.PAY and state == jn.REVERSING) or (kind == jn.CANCEL and state == jn.SUSPECT)


class BridgeCollector(bm.DbGaugeCollector):
    name = "bridge"
    specs = (
        bm.GaugeSpec(SUSPECT, "Pays whose outcome is unknown (SUSPECT), awaiting GetPayment.", ("bank",)),
        bm.GaugeSpec(SUSPECT_AGE, "Age of the oldest SUSPECT pay, in seconds.", ("bank",), merge="max"),
        bm.GaugeSpec(QUEUE_DEPTH, "Reversals queued for delivery to the utility (store-and-forward).", ("bank",)),
        bm.GaugeSpec(QUEUE_AGE, "Age of the oldest queued reversal, in seconds.", ("bank",), merge="max"),
    )

    def __init__(self, engine: Engine, clock: Clock, bank_id: str,
                 limits: bm.CollectorLimits = bm.DEFAULT_COLLECTOR_LIMITS) -> None:
        super().__init__([engine], limits)
        self._clock = clock
        self._banks = [bank_id] if bank_id else []

    def read(self, conn: sa.Connection) -> bm.Readings:
        # The bridge's own bank always has series, at zero when nothing is in doubt.
        zero: dict[tuple[str, ...], float] = {(b,): 0.0 for b in self._banks}
        out: bm.Readings = {SUSPECT: dict(zero), SUSPECT_AGE: dict(zero), QUEUE_DEPTH: dict(zero),
                            QUEUE_AGE: dict(zero)}
        now = self._clock.now()
        for bank, kind, state, n, oldest in conn.execute(IN_DOUBT_BY_BANK):
            age_s = max(0.0, (now - _utc(oldest)).total_seconds()) if oldest is not None else 0.0
            if kind == jn.PAY and state == jn.SUSPECT:
                depth_name, age_name = SUSPECT, SUSPECT_AGE
            elif _in_reversal_queue(kind, state):
                depth_name, age_name = QUEUE_DEPTH, QUEUE_AGE
            else:
                continue
            key = (bank,)
            out[depth_name][key] = out[depth_name].get(key, 0.0) + float(n)
            out[age_name][key] = max(out[age_name].get(key, 0.0), age_s)
        return out


def register(engine: Engine, clock: Clock, bank_id: str, limits: bm.CollectorLimits = bm.DEFAULT_COLLECTOR_LIMITS,
             registry: CollectorRegistry = REGISTRY) -> BridgeCollector:
    """Registers the journal collector and the pool collector; counts the journal's database errors.
    serve.py: `metrics_collector.register(bridge.ctx.engine, bridge.ctx.clock, settings.bank_id)`."""
    bm.instrument_engine(engine)
    if bank_id:
        bm.initialize_bridge_bank(bank_id)
    collector = BridgeCollector(engine, clock, bank_id, limits)
    bm.register_collectors(registry, "bridge", [collector, bm.PoolCollector([engine])])
    return collector
