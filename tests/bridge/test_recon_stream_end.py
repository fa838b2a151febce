"""A reconciliation is applied only when the bank core ended its stream
itself. The trailer is optional, so "no more records" means "that was the
whole day": a stream the bank core cancelled, or one the bridge refused
(a malformed message), must never reach mis_adapter as a finished one. Before,
the bridge half-closed its upstream stream in both cases, and mis_adapter
reconciled the records it had so far: a cancel right after the header closed
the day with no records and reversed every payment of it (UTILITY_ONLY).

Real processes: mis_adapter (SQLite) behind a counting link proxy, the
bridge in process. Each cancelled or refused stream is followed until
mis_adapter has finished handling it (its grpc_server_handled_total), then
the MIS is read directly, and a complete rerun must close the day itself."""
from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.bridge.conftest import BankCore, Utility, new_serial
from tests.bridge.link import Link
from tests.support.waiting import wait_until
from yindian.v1 import billing_pb2 as pb
from yindian_common.db import make_engine
from yindian_common.status import error_info

pytestmark = pytest.mark.timeout(120)
DEADLINE_S = 20.0
WAIT_S = 20.0
RECONCILE = "/yindian.v1.BillingService/Reconcile"


def handled_reconciles(utility: Utility) -> float:
    """Reconcile calls mis_adapter has finished handling, whatever their status."""
    with urllib.request.urlopen(f"http://127.0.0.1:{utility.proc.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "grpc_server_handled_total" and s.labels.get("grpc_method") == "Reconcile")




def closed_days(utility: Utility) -> int:
    eng = make_engine(utility.mis_db, pool_size=1)
    try:
        with eng.connect() as conn:
            return int(conn.execute(sa.text("SELECT COUNT(*) FROM reconciled_days")).scalar_one())
    finally:
        eng.dispose()


def header(day: str) -> pb.ReconcileRequest:
    return pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=day))


def posted(serial: str, account: str, amount_fen: int) -> pb.ReconcileRequest:
    return pb.ReconcileRequest(batch=pb.BankRecordBatch(records=[pb.BankRecord(
        bank_serial=serial, account_no=account, amount_fen=amount_fen, status=pb.BANK_RECORD_STATUS_POSTED)]))


def cancelled_after(core: BankCore, utility: Utility, link: Link, sent: list[pb.ReconcileRequest]) -> None:
    """The bank core sends `sent`, then cancels while the bridge is relaying its stream."""
    handled = handled_reconciles(utility)
    calls_on_link = link.requests
    more = threading.Event()

    def records() -> Iterator[bytes]:
        yield from (m.SerializeToString() for m in sent)
        more.wait(WAIT_S)  # the bank core still sending its records when it cancels

    call = core.channel.stream_stream(RECONCILE)(records(), timeout=DEADLINE_S)
    wait_until(lambda: link.requests > calls_on_link, "the bridge's upstream stream")
    call.cancel()
    more.set()
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
    wait_until(lambda: handled_reconciles(utility) > handled, "mis_adapter to finish with the cancelled stream")


def refused_malformed(core: BankCore, utility: Utility, link: Link, day: str) -> None:
    handled = handled_reconciles(utility)
    calls_on_link = link.requests
    with pytest.raises(grpc.RpcError) as caught:
        list(core.channel.stream_stream(RECONCILE)(iter([header(day).SerializeToString(), b"\xff\xff\xff"]),
                                                   timeout=DEADLINE_S))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    info = error_info(caught.value)
    assert info is not None and info.metadata["field"] == "request"
    if link.requests > calls_on_link:  # the bridge had opened its upstream stream before the refusal
        wait_until(lambda: handled_reconciles(utility) > handled, "mis_adapter to finish with the refused stream")


def test_a_reconciliation_the_bank_core_did_not_end_applies_nothing(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    serial, account = new_serial("RSE"), next(utility.accounts)
    answer = core.pay(serial, account, 1_000)  # a close without its record would reverse it (UTILITY_ONLY)
    assert answer.payment_id and answer.bank_serial == serial
    day = answer.settlement_date
    unfinished: list[Callable[[], None]] = [
        lambda: cancelled_after(core, utility, link, [header(day)]),
        lambda: cancelled_after(core, utility, link, [header(day), posted(new_serial("RSX"), account, 500)]),
        lambda: refused_malformed(core, utility, link, day),
    ]
    for stream in unfinished:
        stream()
        assert closed_days(utility) == 0
        assert utility.payment(serial) == {"state": "POSTED", "amount_fen": 1_000, "account_no": account}

    responses = list(core.stub.Reconcile(iter([header(day), posted(serial, account, 1_000)]), timeout=DEADLINE_S))
    summary = responses[-1].summary
    assert not summary.replayed, "an unfinished stream had closed the day"
    assert {t.outcome: t.count for t in summary.totals if t.count} == {pb.RECONCILE_OUTCOME_MATCHED: 1}
    assert closed_days(utility) == 1
    assert utility.payment(serial) == {"state": "POSTED", "amount_fen": 1_000, "account_no": account}
