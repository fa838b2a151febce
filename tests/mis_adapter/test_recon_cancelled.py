"""A Reconcile stream cancelled by the caller is never reconciled. grpcio
can end a cancelled stream's request iterator as if the caller had sent its
last message (both arrive as "no more messages"; the cancellation is marked
a moment later), and the trailer is optional, so mis_adapter asks whether the
call is still wanted when the records end and again just before the close
commits (recon_service._still_wanted). Before, about one cancelled stream in
twenty closed its day with the records it had; after, asking `is_active()`
twice still let one of 40 close its day in a CI run, and the first question
is now asked behind yindian_common.stream_end's barrier (its own test,
tests/common/test_stream_end.py, shows the race deterministically).

The race is timing-dependent, so the test cancels many streams, each after
mis_adapter has read its header (its message counter), and waits until each
was handled; then not one day may be closed."""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from tests.support.mis_data import NOON, running_adapter
from tests.support.waiting import wait_until
from yindian.v1 import billing_pb2 as pb

pytestmark = [pytest.mark.timeout(180), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema
STREAMS = 40
WAIT_S = 20.0
LABELS = {"grpc_type": "bidi_stream", "grpc_service": "yindian.v1.BillingService", "grpc_method": "Reconcile"}


def counter(name: str, **extra: str) -> float:
    return REGISTRY.get_sample_value(name, {**LABELS, **extra}) or 0.0


def handled() -> float:
    return sum(counter("grpc_server_handled_total", grpc_code=code.name) for code in grpc.StatusCode)




def test_cancelled_reconcile_streams_close_no_day(sqlite_url: str) -> None:
    with running_adapter(sqlite_url) as a:
        for i in range(STREAMS):
            day = (NOON.date() - dt.timedelta(days=i + 1)).isoformat()
            received, done = counter("grpc_server_msg_received_total"), handled()
            more = threading.Event()

            def records(day: str = day, more: threading.Event = more) -> Iterator[pb.ReconcileRequest]:
                yield pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=day))
                more.wait(WAIT_S)

            call = a.stub.Reconcile(records(), timeout=WAIT_S, metadata=[("x-yindian-bank-id", "ICBC")])
            wait_until(lambda n=received: counter("grpc_server_msg_received_total") > n,  # type: ignore[misc]
                       "mis_adapter to read the header")
            call.cancel()
            more.set()
            with pytest.raises(grpc.RpcError):
                list(call)
            wait_until(lambda n=done: handled() > n, "mis_adapter to finish with the stream")  # type: ignore[misc]
        with a.engine.connect() as conn:
            closed = conn.execute(sa.text("SELECT settlement_date FROM reconciled_days")).scalars().all()
    assert closed == [], f"{len(closed)} of {STREAMS} cancelled streams closed their day"
