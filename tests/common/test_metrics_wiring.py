"""The business metrics move where the money paths say (business_metrics' call-site
contract): a small bill feed and a small reconciliation through an in-process
mis_adapter on SQLite, each counter checked for exactly the expected increase."""
from __future__ import annotations

import time

import grpc
import pytest
from prometheus_client import REGISTRY

from tests.e2e.test_recon_e2e import reconcile
from tests.mis_adapter.test_feed import FAST, _issue
from tests.mis_adapter.test_feed_support import debited, insufficient, subscribe
from tests.support.mis_data import running_adapter
from yindian.v1 import billing_pb2 as pb

pytestmark = [pytest.mark.timeout(60), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema
BANK = "ICBC"
POSTED = pb.BANK_RECORD_STATUS_POSTED


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"bank": BANK, **labels}) or 0.0


def counters() -> dict[str, float]:
    out = {
        "sent": value("yindian_feed_notices_sent_total"),
        "acked": value("yindian_feed_notices_acknowledged_total"),
        "debited": value("yindian_feed_debit_results_total", outcome="DEBITED"),
        "insufficient": value("yindian_feed_debit_results_total", outcome="INSUFFICIENT_FUNDS"),
    }
    for outcome in ("MATCHED", "BANK_ONLY", "UTILITY_ONLY", "MISMATCH"):
        out[outcome] = value("yindian_reconcile_records_total", outcome=outcome)
        out[f"{outcome}_fen"] = value("yindian_reconcile_fen_total", outcome=outcome)
    for result in ("COMPLETED", "REPLAYED", "FAILED"):
        out[result] = value("yindian_reconciliations_total", result=result)
    return out


def moved(before: dict[str, float]) -> dict[str, float]:
    after = counters()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_feed_and_reconciliation_move_the_business_metrics(sqlite_url: str) -> None:
    with running_adapter(sqlite_url, **FAST) as ra:
        _issue(ra, 3)
        before = counters()
        feed = subscribe(ra.stub)
        assert value("yindian_feed_streams_active") == 1
        ns = feed.notices(3)
        assert value("yindian_feed_unacknowledged_notices") == 3
        feed.send([debited(ns[0]), debited(ns[1]), insufficient(ns[2])])
        feed.until_cursor(3)
        assert moved(before) == {"sent": 3, "acked": 3, "debited": 2, "insufficient": 1}
        assert value("yindian_feed_unacknowledged_notices") == 0
        feed.close()
        deadline = time.monotonic() + 10
        while value("yindian_feed_streams_active") != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert value("yindian_feed_streams_active") == 0, "the ended stream is no longer counted active"

        # AD-1 reported and matched; AD-2 (debited on the feed) not reported: UTILITY_ONLY.
        before = counters()
        _, summary = reconcile(ra.stub, [("AD-1", ns[0].account_no, ns[0].amount_fen, POSTED)])
        assert not summary.replayed
        totals = {pb.ReconcileOutcome.Name(t.outcome).removeprefix("RECONCILE_OUTCOME_"): t for t in summary.totals}
        expected = {"COMPLETED": 1.0}
        for outcome, t in totals.items():
            if t.count:
                expected[outcome] = t.count
            if t.amount_fen:
                expected[f"{outcome}_fen"] = t.amount_fen
        assert moved(before) == expected
        assert expected["MATCHED"] == 1 and expected["MATCHED_fen"] == ns[0].amount_fen
        assert expected["UTILITY_ONLY"] == 1 and expected["UTILITY_ONLY_fen"] == ns[1].amount_fen

        # The stored result replayed: counted as a replay, its records not again.
        before = counters()
        _, again = reconcile(ra.stub, [("AD-1", ns[0].account_no, ns[0].amount_fen, POSTED)])
        assert again.replayed
        assert moved(before) == {"REPLAYED": 1}

        # A refused reconciliation (a future day) counts as FAILED.
        before = counters()
        with pytest.raises(grpc.RpcError) as err:
            list(ra.stub.Reconcile(iter([pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date="2026-11-29"))]),
                                   metadata=ra.md(), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert moved(before) == {"FAILED": 1}
