"""Acceptance: kill -9 the utility's front end while pays are in flight.

Real processes on loopback: mis_adapter over a seeded SQLite MIS, and the
bridge with its SQLite journal. Bank-core threads send pays with unique
serials through the bridge and retry the same serial on UNAVAILABLE,
ABORTED or DEADLINE_EXCEEDED until the answer is definite. Mid-flight the
test kill -9's mis_adapter, restarts it on the same database and port, and
waits for the bridge to resolve what was in doubt. Then: every pay the bank
saw succeed is POSTED in the MIS exactly once with its amount; every other
one is absent, reversed or tombstoned; and the bills paid plus prepaid
credit gained across the MIS equal the sum of the successful pays."""
from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from tests.support.databases import migrated_sqlite
from tests.support.procs import REPO, Proc, start
from tests.support.waiting import wait_until
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine
from yindian_common.ports import stable_port
from yindian_common.status import error_info

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

BANK = "ICBC"
ACCOUNTS = 300
TELLERS = 8
PAYS_BEFORE_KILL = 40
PAYS_AFTER_RESTART = 40
CALL_TIMEOUT_S = 3.0
RETRY_PAUSE_S = 0.05
RETRY_PAUSE_CAP_S = 0.5
WAIT_S = 45.0
RETRIABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.RESOURCE_EXHAUSTED}



@dataclass
class Ledger:
    """What the bank core saw."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    succeeded: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    in_doubt_answers: int = 0
    gave_up: list[str] = field(default_factory=list)


def teller(n: int, target: str, accounts: list[str], ledger: Ledger, stop: threading.Event) -> None:
    rng = random.Random(n)
    with grpc.insecure_channel(target) as ch:
        stub = billing_pb2_grpc.BillingServiceStub(ch)
        i = 0
        while not stop.is_set():
            i += 1
            req = pb.PayRequest(bank_serial=f"K{n}-{i}", account_no=rng.choice(accounts),
                                amount_fen=rng.randint(100, 60_000), outlet_code="OUT01", teller_id=f"T{n}",
                                channel=pb.CHANNEL_COUNTER)
            pay_until_definite(stub, req, ledger)


def pay_until_definite(stub: billing_pb2_grpc.BillingServiceStub, req: pb.PayRequest, ledger: Ledger) -> None:
    pause_s = RETRY_PAUSE_S
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            resp = stub.Pay(req, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() in RETRIABLE:  # type: ignore[attr-defined]
                with ledger.lock:
                    ledger.in_doubt_answers += 1
                time.sleep(pause_s)  # retry back-off, as a teller would
                pause_s = min(pause_s * 2, RETRY_PAUSE_CAP_S)
                continue
            info = error_info(exc)
            with ledger.lock:
                ledger.failed[req.bank_serial] = info.reason if info else exc.code().name  # type: ignore[attr-defined]
            return
        assert resp.bank_serial == req.bank_serial and resp.amount_fen == req.amount_fen
        with ledger.lock:
            ledger.succeeded[req.bank_serial] = req.amount_fen
        return
    with ledger.lock:
        ledger.gave_up.append(req.bank_serial)


def money_in_mis(engine: sa.Engine) -> int:
    """Bill principal and late fees paid plus prepaid credit held, over the whole MIS."""
    with engine.connect() as conn:
        paid = conn.execute(sa.text("SELECT COALESCE(SUM(principal_paid_fen + late_fee_paid_fen), 0) "
                                    "FROM bills")).scalar_one()
        prepaid = conn.execute(sa.text("SELECT COALESCE(SUM(prepaid_fen), 0) FROM customers")).scalar_one()
    return int(paid) + int(prepaid)


def test_kill_9_adapter_mid_flight_every_success_posted_once_and_money_adds_up(tmp_path: Path) -> None:
    mis_db = migrated_sqlite(tmp_path / "mis.db")
    journal_db = migrated_sqlite(tmp_path / "bridge.db", "bridge")
    subprocess.run([sys.executable, "-m", "mis_adapter", "seed", "--db", mis_db, "--accounts", str(ACCOUNTS),
                    "--roster-dir", str(tmp_path / "rosters")], cwd=REPO, check=True, timeout=120,
                   capture_output=True)
    mis = make_engine(mis_db, pool_size=2)
    with mis.connect() as conn:
        accounts = [r[0] for r in conn.execute(sa.text("SELECT account_no FROM customers WHERE status = 'OPEN'"))]
    money_before = money_in_mis(mis)

    adapter_args = ["mis_adapter", "serve", "--db", mis_db, "--metrics-port", "0", "--insecure"]
    adapter: Proc = start("mis_adapter", [*adapter_args, "--listen", f"127.0.0.1:{stable_port()}"], log_dir=tmp_path)
    bridge = start("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", adapter.grpc_addr,
                              "--db", journal_db, "--bank-id", BANK, "--metrics-port", "0", "--insecure",
                              "--resolver-idle-wait-s", "0.1", "--resolver-backoff-cap-s", "1.0",
                              "--upstream-deadline-cap-s", "2.0"], log_dir=tmp_path)
    ledger, stop = Ledger(), threading.Event()
    threads = [threading.Thread(target=teller, args=(n, bridge.grpc_addr, accounts, ledger, stop), daemon=True)
               for n in range(TELLERS)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(ledger.succeeded) >= PAYS_BEFORE_KILL, "pays before the kill", WAIT_S)
        seen_before_kill = ledger.in_doubt_answers
        adapter.kill9()
        wait_until(lambda: ledger.in_doubt_answers > seen_before_kill, "the bank core to see the utility gone", WAIT_S)
        adapter = start("mis_adapter-2", [*adapter_args, "--listen", adapter.grpc_addr], log_dir=tmp_path)
        target = len(ledger.succeeded) + PAYS_AFTER_RESTART
        wait_until(lambda: len(ledger.succeeded) >= target, "pays after the restart", WAIT_S)
        stop.set()
        for t in threads:
            t.join(WAIT_S)
        assert not any(t.is_alive() for t in threads) and not ledger.gave_up

        journal = make_engine(journal_db, pool_size=1)
        in_doubt = sa.text("SELECT COUNT(*) FROM bridge_journal WHERE state IN ('PENDING', 'SUSPECT', 'REVERSING')")

        def resolved() -> bool:
            with journal.connect() as conn:
                return int(conn.execute(in_doubt).scalar_one()) == 0
        wait_until(resolved, "the bridge to resolve every in-doubt pay", WAIT_S)
        with journal.connect() as conn:
            bridge_states = dict(conn.execute(sa.text("SELECT serial, state FROM bridge_journal WHERE kind = 'PAY'"))
                                 .all())
        journal.dispose()

        with mis.connect() as conn:
            rows = conn.execute(sa.text("SELECT bank_serial, state, amount_fen FROM payments WHERE bank_id = :b"),
                                {"b": BANK}).all()
        mis_rows = {r.bank_serial: (r.state, r.amount_fen) for r in rows}
        assert len(mis_rows) == len(rows)
        assert ledger.succeeded, "no pay went through"
        assert ledger.failed, "the kill left no pay in doubt: the test proves nothing"
        for serial, amount in ledger.succeeded.items():
            assert mis_rows.get(serial) == ("POSTED", amount), serial
            assert bridge_states[serial] == "POSTED"
        for serial, reason in ledger.failed.items():
            assert reason == "PAYMENT_NOT_APPLIED", (serial, reason)
            assert mis_rows.get(serial, ("ABSENT", 0))[0] in ("ABSENT", "REVERSED", "TOMBSTONE"), serial
            assert bridge_states[serial] == "NOT_APPLIED"
        posted = {s for s, (state, _) in mis_rows.items() if state == "POSTED"}
        assert posted == set(ledger.succeeded)
        assert money_in_mis(mis) - money_before == sum(ledger.succeeded.values())
    finally:
        stop.set()
        mis.dispose()
        assert bridge.terminate() == 0
        adapter.terminate()
