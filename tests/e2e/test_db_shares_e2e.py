"""Issue 9 item 5 with real processes on PostgreSQL: one bank's stalled
Reconcile streams do not starve another bank (bounded connection shares,
refusals RESOURCE_EXHAUSTED with a reason), and health says NOT_SERVING
while the database is unreachable and SERVING again after."""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mis_adapter.migrate import upgrade
from tests.support import procs
from tests.support.mis_data import BillSpec, add_account, add_bank
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine
from yindian_common.status import error_info

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
CLOCK = "2026-11-28T10:00:00+08:00"
POOL = 8
BILLS = [BillSpec("202610", 15_000, __import__("datetime").date(2026, 11, 25))]


def start_mis(url: str, tmp_path: Path) -> procs.Proc:
    return procs.start("mis_adapter", ["mis_adapter", "serve", "--db", url, "--listen", "127.0.0.1:0",
                                       "--metrics-port", "0", "--insecure", "--clock-start", CLOCK,
                                       "--db-pool-size", str(POOL), "--db-health-interval-s", "0.2",
                                       "--db-pool-timeout-s", "2"], log_dir=tmp_path)


def test_stalled_streams_of_one_bank_do_not_starve_another(pg_url: str, tmp_path: Path) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    for b in ("ICBC", "ABC"):
        add_bank(engine, b)
    acct = add_account(engine, "01", 1, BILLS)
    engine.dispose()
    mis = start_mis(pg_url, tmp_path)
    stalled: list[queue.Queue[pb.ReconcileRequest | None]] = []
    calls = []
    try:
        with grpc.insecure_channel(mis.grpc_addr) as ch:
            stub = billing_pb2_grpc.BillingServiceStub(ch)
            # ICBC opens 16 Reconcile streams, sends each its header and a batch, then goes silent.
            for _ in range(16):
                q: queue.Queue[pb.ReconcileRequest | None] = queue.Queue()
                q.put(pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date="2026-11-28")))
                q.put(pb.ReconcileRequest(batch=pb.BankRecordBatch(records=[pb.BankRecord(
                    bank_serial="S1", account_no=acct, amount_fen=100, status=pb.BANK_RECORD_STATUS_POSTED)])))
                stalled.append(q)
                calls.append(stub.Reconcile(iter(q.get, None), metadata=[("x-yindian-bank-id", "ICBC")],
                                            timeout=60))
            refused = []
            deadline = time.monotonic() + 20
            while len(refused) < 16 - 1 and time.monotonic() < deadline:  # streams: 2 of 8; one bank: 1
                for c in calls:
                    if c not in refused and c.done():
                        refused.append(c)
                time.sleep(0.05)
            for c in refused:
                with pytest.raises(grpc.RpcError) as exc:
                    next(c)
                assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_info(exc.value).reason in ("STREAM_CONNECTION_SHARE", "BANK_CONNECTION_SHARE")
            assert len(refused) == 15
            # ABC is served meanwhile, promptly.
            md = [("x-yindian-bank-id", "ABC")]
            for i in range(20):
                t0 = time.monotonic()
                q_ = stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=md, timeout=5)
                assert q_.account_no == acct
                r = stub.Pay(pb.PayRequest(bank_serial=f"ABC-{i}", account_no=acct, amount_fen=100,
                                           outlet_code="O", teller_id="T", channel=pb.CHANNEL_COUNTER),
                             metadata=md, timeout=5)
                assert r.amount_fen == 100 and time.monotonic() - t0 < 2
        for q in stalled:
            q.put(None)
        for c in calls:
            c.cancel()
    finally:
        mis.terminate()


def health_status(stub: health_pb2_grpc.HealthStub) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def wait_health(stub: health_pb2_grpc.HealthStub, want: int) -> None:
    deadline = time.monotonic() + 20
    while health_status(stub) != want:
        assert time.monotonic() < deadline, f"health never became {want}"
        threading.Event().wait(0.1)


def test_health_follows_the_database(pg_url: str, tmp_path: Path) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    engine.dispose()
    mis = start_mis(pg_url, tmp_path)
    name = sa.make_url(pg_url).database
    admin = sa.create_engine(sa.make_url(pg_url).set(database="postgres").render_as_string(hide_password=False)
                             .replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    try:
        with grpc.insecure_channel(mis.grpc_addr) as ch, admin.connect() as conn:
            stub = health_pb2_grpc.HealthStub(ch)
            assert health_status(stub) == health_pb2.HealthCheckResponse.SERVING
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                         {"d": name})
            wait_health(stub, health_pb2.HealthCheckResponse.NOT_SERVING)
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            wait_health(stub, health_pb2.HealthCheckResponse.SERVING)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.dispose()
        mis.terminate()
