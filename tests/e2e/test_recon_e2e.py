"""Reconciliation and reports end to end: mis_adapter and the bank's bridge as
real processes on loopback, the bank core's calls made through the bridge.
A reconciled day answers with discrepancies and a summary, replays it, and
refuses cancels; ReportService reports the day; a day with a payment in
doubt at the bridge is refused until it is resolved.

Both scenarios run on one database and on three branch databases (front
database plus --branch-db 02 and 03), the bank's accounts taken in turn
from each branch."""
from __future__ import annotations

import datetime as dt
import itertools
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bank_sim import ledger
from mis_adapter.routing import BranchRouter
from mis_adapter.seed import seed
from tests.support import procs
from tests.support.topology import BRANCHES3, SINGLE, Topology, topology_databases
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc, report_pb2, report_pb2_grpc
from yindian_common.db import make_engine
from yindian_common.status import error_info

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
CLOCK = "2026-11-28T10:00:00+08:00"
DAY = "2026-11-28"
BANK = ("x-yindian-bank-id", "ICBC")
OPERATOR = ("x-yindian-operator", "ops")


@pytest.fixture(params=[SINGLE, BRANCHES3])
def servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[procs.Proc, procs.Proc, list[str]]]:
    with topology_databases("sqlite", request.param, tmp_path, schema="mis") as topo:
        yield from _servers(topo, tmp_path)


def _servers(topo: Topology, tmp_path: Path) -> Iterator[tuple[procs.Proc, procs.Proc, list[str]]]:
    router = BranchRouter.from_specs(topo.db, topo.branch_db)
    seed(router, 30 * len(topo.codes), tmp_path / "rosters", today=dt.date(2026, 11, 28),
         now=dt.datetime.fromisoformat(CLOCK), arrears_share=0.6)
    roster = (tmp_path / "rosters" / "ICBC.csv").read_text().split()[1:]
    # the accounts taken in turn from each database (with branches: 02's, 03's, the front's, ...)
    by_db: dict[str, list[str]] = {}
    for acct in roster:
        by_db.setdefault(acct[:2] if acct[:2] in ("02", "03") else "", []).append(acct)
    if topo.split:
        rows = itertools.zip_longest(*(by_db[k] for k in sorted(by_db, key=lambda k: k or "99")))
        roster = [acct for row in rows for acct in row if acct is not None]
    router.dispose()
    mis = procs.start("mis_adapter", ["mis_adapter", "serve", *topo.cli_flags(), "--listen", "127.0.0.1:0",
                                      "--metrics-port", "0", "--insecure", "--clock-start", CLOCK,
                                      "--operators", "ops"], log_dir=tmp_path)
    bridge = procs.start("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", mis.grpc_addr,
                                    "--db", f"sqlite:///{tmp_path / 'bridge.db'}", "--bank-id", "ICBC",
                                    "--metrics-port", "0", "--insecure", "--clock-start", CLOCK], log_dir=tmp_path)
    try:
        yield mis, bridge, roster
    finally:
        for p in (bridge, mis):
            p.terminate()


def stream(records: list[tuple[str, str, int, int]], *, trailer: bool = True) -> Iterator[pb.ReconcileRequest]:
    yield pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=DAY))
    for i in range(0, len(records), 2):
        yield pb.ReconcileRequest(batch=pb.BankRecordBatch(records=[
            pb.BankRecord(bank_serial=s, account_no=a, amount_fen=f, status=st) for s, a, f, st in records[i:i + 2]]))
    if trailer:
        yield pb.ReconcileRequest(trailer=pb.ReconcileTrailer(record_count=len(records),
                                                              total_fen=sum(r[2] for r in records)))


def reconcile(stub: billing_pb2_grpc.BillingServiceStub, records: list[tuple[str, str, int, int]],
              timeout_s: float = 30) -> tuple[list[pb.Discrepancy], pb.ReconcileSummary]:
    lines: list[pb.Discrepancy] = []
    summary = None
    for resp in stub.Reconcile(stream(records), metadata=(BANK,), timeout=timeout_s):
        if resp.WhichOneof("body") == "discrepancies":
            lines.extend(resp.discrepancies.discrepancies)
        else:
            summary = resp.summary
    assert summary is not None
    return lines, summary


def test_reconcile_through_the_bridge_then_report(servers: tuple[procs.Proc, procs.Proc, list[str]]) -> None:
    mis, bridge, roster = servers
    with grpc.insecure_channel(bridge.grpc_addr) as ch_b, grpc.insecure_channel(mis.grpc_addr) as ch_m:
        bank = billing_pb2_grpc.BillingServiceStub(ch_b)
        a = roster
        for serial, acct, fen in (("P-1", a[0], 1_000), ("P-2", a[1], 2_000), ("P-3", a[2], 300)):
            bank.Pay(pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=fen, outlet_code="0101",
                                   teller_id="T1", channel=pb.CHANNEL_COUNTER), metadata=(BANK,), timeout=10)
        bank.Cancel(pb.CancelRequest(cancel_serial="C-3", original_serial="P-3", amount_fen=300), metadata=(BANK,),
                    timeout=10)
        P, C = pb.BANK_RECORD_STATUS_POSTED, pb.BANK_RECORD_STATUS_CANCELLED
        records = [("P-1", a[0], 1_000, P), ("P-2", a[1], 2_500, P), ("P-3", a[2], 300, C), ("B-1", a[3], 700, P)]

        lines, summary = reconcile(bank, records)
        assert {d.bank_serial: d.outcome for d in lines} == {"P-2": pb.RECONCILE_OUTCOME_MISMATCH,
                                                             "B-1": pb.RECONCILE_OUTCOME_BANK_ONLY}
        totals = {t.outcome: (t.count, t.amount_fen) for t in summary.totals}
        assert totals == {pb.RECONCILE_OUTCOME_MATCHED: (2, 1_300), pb.RECONCILE_OUTCOME_BANK_ONLY: (1, 700),
                          pb.RECONCILE_OUTCOME_UTILITY_ONLY: (0, 0), pb.RECONCILE_OUTCOME_MISMATCH: (1, 2_500)}
        assert summary.net_settlement_fen == 1_000 + 2_000 + 700 and not summary.replayed
        assert summary.settlement_date == DAY and summary.record_count == 4
        # The BANK_ONLY payment is now in the MIS, as a Pay would have left it.
        got = bank.GetPayment(pb.GetPaymentRequest(bank_serial="B-1"), metadata=(BANK,), timeout=10)
        assert got.state == pb.PAYMENT_STATE_POSTED and got.payment.amount_fen == 700

        lines2, again = reconcile(bank, records[:1])
        assert again.replayed and list(again.totals) == list(summary.totals) and lines2 == lines
        with pytest.raises(grpc.RpcError) as err:
            bank.Cancel(pb.CancelRequest(cancel_serial="C-1", original_serial="P-1", amount_fen=1_000),
                        metadata=(BANK,), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(err.value).reason == "DAY_RECONCILED"

        # A malformed stream is refused whole, naming the record.
        with pytest.raises(grpc.RpcError) as err:
            list(bank.Reconcile(iter([pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date="2026-11-27")),
                                      pb.ReconcileRequest(batch=pb.BankRecordBatch(records=[pb.BankRecord(
                                          bank_serial="Z-1", account_no="0000000001", amount_fen=5,
                                          status=P)]))]), metadata=(BANK,), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(err.value).metadata["field"] == "records[1].account_no"

        reports = report_pb2_grpc.ReportServiceStub(ch_m)
        coll = reports.CollectionSummary(report_pb2.CollectionSummaryRequest(
            from_date=DAY, to_date=DAY, group_by=report_pb2.GROUP_BY_BANK), metadata=(OPERATOR,), timeout=10)
        icbc = {r.key: r for r in coll.rows}["ICBC"]
        assert (icbc.count, icbc.amount_fen, icbc.cancelled_count, icbc.cancelled_fen) == (3, 3_700, 1, 300)
        arrears = reports.ArrearsSummary(report_pb2.ArrearsSummaryRequest(as_of_date=DAY), metadata=(OPERATOR,),
                                         timeout=10)
        assert arrears.total.households > 0 and arrears.as_of_date == DAY
        detail = [acc for page in reports.ArrearsDetail(report_pb2.ArrearsDetailRequest(as_of_date=DAY),
                                                        metadata=(OPERATOR,), timeout=10)
                  for acc in page.accounts]
        assert len(detail) == arrears.total.households
        assert sum(acc.principal_fen for acc in detail) == arrears.total.principal_fen
        with pytest.raises(grpc.RpcError) as err:
            reports.ArrearsSummary(report_pb2.ArrearsSummaryRequest(as_of_date="2030-01-01"), metadata=(OPERATOR,),
                                   timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A payment in doubt at the bridge (the utility is gone): the bridge refuses the day, naming it.
    mis.terminate()
    with grpc.insecure_channel(bridge.grpc_addr) as ch_b:
        bank = billing_pb2_grpc.BillingServiceStub(ch_b)
        with pytest.raises(grpc.RpcError):
            bank.Pay(pb.PayRequest(bank_serial="P-9", account_no=roster[4], amount_fen=100,
                                   channel=pb.CHANNEL_COUNTER), metadata=(BANK,), timeout=2)
        with pytest.raises(grpc.RpcError) as err:
            reconcile(bank, [("P-1", roster[0], 1_000, pb.BANK_RECORD_STATUS_POSTED)], timeout_s=4)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert error_info(err.value).reason == "DAY_IN_DOUBT"
        assert "1 payments or cancels" in err.value.details()


def test_bank_core_reconciles_its_ledger_through_the_bridge(servers: tuple[procs.Proc, procs.Proc, list[str]],
                                                            tmp_path: Path) -> None:
    """`python -m bank_sim reconcile`: the ledger's POSTED and CANCELLED rows of the day go through the
    bridge; a PENDING row (money taken, outcome unknown) makes the bank core refuse first."""
    _mis, bridge, roster = servers
    bank_url = f"sqlite:///{tmp_path / 'bank.db'}"
    engine = make_engine(bank_url)
    ledger.create_schema(engine)
    now = dt.datetime.fromisoformat(CLOCK)
    day = dt.date.fromisoformat(DAY)
    with engine.begin() as conn:
        ledger.load_passbooks(conn, "ICBC", roster[:4], rng=random.Random(1), low_balance_ratio=0.0, now=now)
    with grpc.insecure_channel(bridge.grpc_addr) as ch:
        bank = billing_pb2_grpc.BillingServiceStub(ch)
        for i, acct in enumerate(roster[:3]):
            serial = f"L-{i}"
            with engine.begin() as conn:
                ledger.debit_for_pay(conn, bank_id="ICBC", bank_serial=serial, account_no=acct, amount_fen=100 + i,
                                     channel="COUNTER", outlet_code="OUT001", teller_id="TLR00101", now=now)
            resp = bank.Pay(pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=100 + i,
                                          outlet_code="OUT001", teller_id="TLR00101", channel=pb.CHANNEL_COUNTER),
                            metadata=(BANK,), timeout=10)
            with engine.begin() as conn:
                ledger.mark_posted(conn, bank_id="ICBC", bank_serial=serial, settlement_date=day,
                                   receipt_no=resp.receipt_no, payment_id=resp.payment_id, now=now)
        bank.Cancel(pb.CancelRequest(cancel_serial="LC-2", original_serial="L-2", amount_fen=102), metadata=(BANK,),
                    timeout=10)
        with engine.begin() as conn:
            ledger.mark_cancelled(conn, bank_id="ICBC", bank_serial="L-2", cancel_date=day, now=now)
            ledger.debit_for_pay(conn, bank_id="ICBC", bank_serial="L-9", account_no=roster[3], amount_fen=50,
                                 channel="COUNTER", outlet_code="OUT001", teller_id="TLR00101", now=now)

    cmd = [sys.executable, "-m", "bank_sim", "reconcile", "--target", bridge.grpc_addr, "--bank-id", "ICBC",
           "--insecure", "--db", bank_url, "--date", DAY, "--summary-json", str(tmp_path / "recon.json")]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=procs.REPO)
    assert refused.returncode == 2 and "L-9 is still PENDING" in refused.stderr
    with engine.begin() as conn:
        ledger.mark_failed(conn, bank_id="ICBC", bank_serial="L-9", reason="test", now=now)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=procs.REPO)
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "recon.json").read_text())
    assert out["record_count"] == 3 and out["discrepancies"] == 0
    assert out["totals"]["MATCHED"] == {"count": 3, "amount_fen": 100 + 101 + 102}
    assert out["net_settlement_fen"] == 100 + 101
    engine.dispose()
