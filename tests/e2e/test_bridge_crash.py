"""Issue 9 item 1: what the bank core was told is what the journal holds.

Pay P through the bridge; the utility's operator suspends the bank; Cancel of
P is answered UNAVAILABLE reason BANK_SUSPENDED (a definite refusal: the bank
core keeps P standing); the bridge dies the moment that answer has gone out
(crash point `bridge.after_reply`: SIGKILL). After restart and
resume, the bridge must not apply the cancel on its own: the MIS still has P
POSTED and the journal does not hold the cancel as CANCELLED.

Real processes: mis_adapter on a seeded SQLite MIS, the bridge with its
SQLite journal (started three times: normal, armed, normal)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from tests.support.databases import migrated_sqlite
from tests.support.procs import REPO, Proc, start
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine
from yindian_common.status import error_info

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

BANK = "ICBC"
CALL_TIMEOUT_S = 10.0
WAIT_S = 30.0
CRASH_EXIT_CODE = -9  # SIGKILL (yindian_common.crash_points)


def bridge_args(upstream: str, journal_db: str) -> list[str]:
    # A long linger would let an answered outcome wait unrecorded: the fix must not depend on it being short.
    return ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", upstream, "--db", journal_db,
            "--bank-id", BANK, "--metrics-port", "0", "--insecure", "--resolver-idle-wait-s", "0.1",
            "--resolver-backoff-initial-s", "0.05", "--resolver-backoff-cap-s", "0.2", "--journal-linger-s", "2"]


def bank_admin(mis_db: str, action: str) -> None:
    subprocess.run([sys.executable, "-m", "mis_adapter", "bank", action, BANK, "--db", mis_db], cwd=REPO,
                   check=True, timeout=60, capture_output=True)


def journal_row(journal_db: str, kind: str, serial: str) -> tuple[str, str] | None:
    eng = make_engine(journal_db, pool_size=1)
    try:
        with eng.connect() as conn:
            row = conn.execute(sa.text("SELECT state, message FROM bridge_journal WHERE kind = :k AND serial = :s"),
                               {"k": kind, "s": serial}).first()
    finally:
        eng.dispose()
    return (row[0], row[1]) if row is not None else None


def mis_state(mis_db: str, serial: str) -> str | None:
    eng = make_engine(mis_db, pool_size=1)
    try:
        with eng.connect() as conn:
            return conn.execute(sa.text("SELECT state FROM payments WHERE bank_id = :b AND bank_serial = :s"),
                                {"b": BANK, "s": serial}).scalar()
    finally:
        eng.dispose()


def test_refused_cancel_stays_refused_after_a_bridge_crash_right_after_answering(tmp_path: Path) -> None:
    mis_db = migrated_sqlite(tmp_path / "mis.db")
    journal_db = migrated_sqlite(tmp_path / "bridge.db", "bridge")
    subprocess.run([sys.executable, "-m", "mis_adapter", "seed", "--db", mis_db, "--accounts", "50",
                    "--roster-dir", str(tmp_path / "rosters")], cwd=REPO, check=True, timeout=120,
                   capture_output=True)
    account = (tmp_path / "rosters" / f"{BANK}.csv").read_text().splitlines()[1].split(",")[0]
    adapter = start("mis_adapter", ["mis_adapter", "serve", "--db", mis_db, "--listen", "127.0.0.1:0",
                                    "--metrics-port", "0", "--insecure", "--bank-status-ttl-s", "0"],
                    log_dir=tmp_path)
    bridge: Proc | None = None
    try:
        bridge = start("bridge-1", bridge_args(adapter.grpc_addr, journal_db), log_dir=tmp_path)
        with grpc.insecure_channel(bridge.grpc_addr) as ch:
            billing_pb2_grpc.BillingServiceStub(ch).Pay(
                pb.PayRequest(bank_serial="CRASH-P1", account_no=account, amount_fen=12_345, outlet_code="OUT01",
                              teller_id="T01", channel=pb.CHANNEL_COUNTER), timeout=CALL_TIMEOUT_S)
        assert bridge.terminate() == 0
        bank_admin(mis_db, "suspend")

        bridge = start("bridge-armed", bridge_args(adapter.grpc_addr, journal_db), log_dir=tmp_path,
                       env={"YINDIAN_CRASH_POINT": "bridge.after_reply"})
        with grpc.insecure_channel(bridge.grpc_addr) as ch, pytest.raises(grpc.RpcError) as refused:
            billing_pb2_grpc.BillingServiceStub(ch).Cancel(
                pb.CancelRequest(cancel_serial="CRASH-C1", original_serial="CRASH-P1", amount_fen=12_345,
                                 reason="customer changed mind"), timeout=CALL_TIMEOUT_S)
        assert bridge.popen.wait(timeout=WAIT_S) == CRASH_EXIT_CODE
        info = error_info(refused.value)
        told_refused = refused.value.code() == grpc.StatusCode.UNAVAILABLE and info is not None \
            and info.reason == "BANK_SUSPENDED"
        assert told_refused, f"the bank core was not told the refusal: {refused.value}"

        bank_admin(mis_db, "resume")
        bridge = start("bridge-2", bridge_args(adapter.grpc_addr, journal_db), log_dir=tmp_path)
        # What the bank core was told is what the journal holds: a refusal, recorded before it was sent.
        row = journal_row(journal_db, "CANCEL", "CRASH-C1")
        assert row is not None and row[0] == "RETRYABLE", row
        # Let the resolver run passes (it would resend an in-doubt cancel within ~0.2 s); nothing may change.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert mis_state(mis_db, "CRASH-P1") == "POSTED"
            assert journal_row(journal_db, "CANCEL", "CRASH-C1") == row
            time.sleep(0.1)
    finally:
        if bridge is not None and bridge.popen.poll() is None:
            bridge.terminate()
        adapter.terminate()
