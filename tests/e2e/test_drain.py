"""SIGTERM drains: a pay in flight when the signal arrives still completes and
is answered, health turns NOT_SERVING, new calls are refused, and the process
exits 0 (DESIGN.md operator interface; STYLE.md shutdown)."""
from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from mis_adapter.migrate import upgrade
from tests.support import procs
from tests.support.mis_data import BillSpec, add_account, add_bank
from tests.support.waiting import wait_until
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine

pytestmark = pytest.mark.e2e


def _started_pays(metrics_port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith("grpc_server_started_total") and 'grpc_method="Pay"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0



def test_sigterm_drains_the_pay_in_flight_and_exits_0(tmp_path: Path) -> None:
    db_file = tmp_path / "mis.db"
    engine = make_engine(f"sqlite:///{db_file}")
    upgrade(engine)
    add_bank(engine, "ICBC")
    acct = add_account(engine, "01", 1, [BillSpec("202610", 10_000, dt.date(2026, 11, 25))])
    engine.dispose()
    proc = procs.start("mis_adapter", ["mis_adapter", "serve", "--db", f"sqlite:///{db_file}", "--listen",
                                       "127.0.0.1:0", "--metrics-port", "0", "--insecure", "--grace-s", "20",
                                       "--clock-start", "2026-11-28T12:00:00+08:00"], log_dir=tmp_path)
    # Hold SQLite's write lock so that the pay is still in progress when the signal comes.
    blocker = sqlite3.connect(db_file, isolation_level=None, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")
    answers: list[object] = []
    with grpc.insecure_channel(proc.grpc_addr) as ch:
        stub = billing_pb2_grpc.BillingServiceStub(ch)

        def pay() -> None:
            try:
                answers.append(stub.Pay(pb.PayRequest(bank_serial="D1", account_no=acct, amount_fen=10_100,
                                                      channel=pb.CHANNEL_COUNTER),
                                        metadata=[("x-yindian-bank-id", "ICBC")], timeout=60))
            except grpc.RpcError as e:
                answers.append(e)

        t = threading.Thread(target=pay)
        t.start()
        wait_until(lambda: _started_pays(proc.metrics_port) >= 1, "the pay to reach the server", 30)
        proc.popen.terminate()
        # While draining, new calls are refused.
        with grpc.insecure_channel(proc.grpc_addr) as ch2:
            late = billing_pb2_grpc.BillingServiceStub(ch2)

            def refused() -> bool:
                try:
                    late.QueryAccount(pb.QueryAccountRequest(account_no=acct),
                                      metadata=[("x-yindian-bank-id", "ICBC")], timeout=2)
                except grpc.RpcError as e:
                    return e.code() == grpc.StatusCode.UNAVAILABLE
                return False
            wait_until(refused, "new calls to be refused during the drain", 15)
        blocker.execute("ROLLBACK")
        blocker.close()
        t.join(timeout=60)
    assert len(answers) == 1 and isinstance(answers[0], pb.PayResponse), answers
    assert answers[0].allocations[0].principal_fen == 10_000
    assert proc.popen.wait(timeout=30) == 0
    check = sa.create_engine(f"sqlite:///{db_file}")
    with check.connect() as conn:
        assert conn.execute(sa.text("select state from payments where bank_serial='D1'")).scalar_one() == "POSTED"
    check.dispose()
