"""Acceptance for the link's other transactions, with real processes on
loopback: mis_adapter over a seeded SQLite MIS, the bank's bridge, and the
bank core (bank_sim autodebit as a process; the counter's calls from here).

- Agreement lifecycle through the bridge: sign -> the next issued bill is fed
  and debited -> end -> the following bill is not fed (another account's
  still is); replayed sign/end change nothing; another bank can neither see
  nor end it.
- A debit that meets a bill already paid at the counter reaches the bank as
  a refund once: the bank credits the passbook, then mis_adapter and the
  bridge are killed -9 before the acknowledgement; after restarts the refund
  is listed again, not credited again, acknowledged, and the day's
  reconciliation nets it.
- Sign-off then a counter pay settles on the next day; sign-on again: same
  day; the operator's suspension overrides sign-on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from bank_sim import ledger, link_ops
from tests.support import procs
from tests.support.databases import migrated_sqlite
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.clock import make_clock
from yindian_common.db import make_engine
from yindian_common.status import error_info

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO = procs.REPO
BANK = "ICBC"
CLOCK_START = "2026-11-28T12:00:00+08:00"
TODAY = "2026-11-28"
TOMORROW = "2026-11-29"
ACCOUNTS = 120
FEED_FLAGS = ["--feed-heartbeat-s", "0.3", "--feed-lease-ttl-s", "3", "--feed-poll-interval-s", "0.05"]
CALL_S = 10.0


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


class Stack:
    """A seeded utility, its mis_adapter and the bank's bridge, restartable on the same databases."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mis_db = migrated_sqlite(tmp / "mis.db")
        self.bridge_db = migrated_sqlite(tmp / "bridge.db", "bridge")
        self.bank_db = f"sqlite:///{tmp / 'bank.db'}"
        run("mis_adapter", "seed", "--db", self.mis_db, "--accounts", str(ACCOUNTS), "--roster-dir",
            str(tmp / "rosters"), "--clock-start", CLOCK_START)
        self.adapter = self.bridge = None  # type: procs.Proc | None  # type: ignore[assignment]
        self.start()
        self.bank = make_engine(self.bank_db, pool_size=2)
        link_ops.create_schema(self.bank)
        self.mis = make_engine(self.mis_db, pool_size=2)

    def start(self) -> None:
        self.adapter = procs.start("mis_adapter", [
            "mis_adapter", "serve", "--db", self.mis_db, "--listen", "127.0.0.1:0", "--metrics-port", "0",
            "--insecure", "--clock-start", CLOCK_START, "--bank-status-ttl-s", "0", *FEED_FLAGS], log_dir=self.tmp)
        self.bridge = procs.start("bridge", [
            "bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", self.adapter.grpc_addr, "--db",
            self.bridge_db, "--bank-id", BANK, "--metrics-port", "0", "--insecure", "--clock-start", CLOCK_START],
            log_dir=self.tmp)
        self.channel = grpc.insecure_channel(self.bridge.grpc_addr)
        self.stub = billing_pb2_grpc.BillingServiceStub(self.channel)
        self.utility_channel = grpc.insecure_channel(self.adapter.grpc_addr)
        self.utility = billing_pb2_grpc.BillingServiceStub(self.utility_channel)

    def kill9(self) -> None:
        self.channel.close()
        self.utility_channel.close()
        assert self.adapter is not None and self.bridge is not None
        self.adapter.kill9()
        self.bridge.kill9()

    def stop(self) -> None:
        self.channel.close()
        self.utility_channel.close()
        for p in (self.bridge, self.adapter):
            if p is not None and p.popen.poll() is None:
                assert p.terminate() == 0
        self.bank.dispose()
        self.mis.dispose()

    def sql(self, query: str, **params: object) -> list[sa.Row]:  # type: ignore[type-arg]
        with self.mis.connect() as conn:
            return list(conn.execute(sa.text(query), params))

    def free_accounts(self, n: int) -> list[str]:
        # Open, no agreement, nothing owed and no prepaid credit: the next bill is exactly what is fed.
        rows = self.sql("SELECT account_no FROM customers WHERE status = 'OPEN' AND prepaid_fen = 0 AND account_no "
                        "NOT IN (SELECT account_no FROM agreements) AND account_no NOT IN "
                        "(SELECT account_no FROM bills WHERE status != 'PAID') ORDER BY account_no LIMIT :n", n=n)
        return [r[0] for r in rows]

    def autodebit(self, after_seq: int) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "bank_sim", "autodebit", "--target", self.bridge.grpc_addr,  # type: ignore[union-attr]
             "--db", self.bank_db, "--bank-id", BANK, "--insecure", "--clock-start", CLOCK_START,
             "--roster", str(self.tmp / "rosters" / f"{BANK}.csv"), "--idle-exit-s", "1.5",
             "--idle-exit-after-seq", str(after_seq), "--silence-s", "3", "--retry-backoff-cap-s", "0.5",
             "--run-timeout-s", "120"],
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def last_seq(self) -> int:
        return int(self.sql("SELECT COALESCE(MAX(seq), 0) FROM feed_outbox WHERE bank_id = :b", b=BANK)[0][0])

    def add_reading(self, acct: str, period: str) -> None:
        with self.mis.begin() as conn:
            conn.execute(sa.text("INSERT INTO readings (meter_no, account_no, period, register_kwh, kwh, read_on, "
                                 "billed) VALUES (:m, :a, :p, 99999, 150, :d, 0)"),
                         {"m": f"M{acct}", "a": acct, "p": period, "d": TODAY})


def _code(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    info = error_info(e.value)  # type: ignore[arg-type]
    return e.value.code(), info.reason if info else ""  # type: ignore[attr-defined]


def _pay(stub: billing_pb2_grpc.BillingServiceStub, serial: str, acct: str, amount_fen: int) -> pb.PayResponse:
    return stub.Pay(pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=amount_fen, outlet_code="OUT01",
                                  teller_id="T01", channel=pb.CHANNEL_COUNTER), timeout=CALL_S)  # type: ignore[no-any-return]


def test_agreement_lifecycle_and_sign_off_through_the_bridge(tmp_path: Path) -> None:
    st = Stack(tmp_path)
    try:
        clock = make_clock(CLOCK_START)
        acct, other = st.free_accounts(2)
        abc = [("x-yindian-bank-id", "ABC")]
        signed = link_ops.sign_at_counter(st.bank, st.stub, BANK, acct, "AG-E2E-1", clock, timeout_s=CALL_S,
                                          opening_balance_fen=500_000)
        assert (signed.replayed, signed.agreement.state) == (False, pb.AGREEMENT_STATE_ACTIVE)
        link_ops.sign_at_counter(st.bank, st.stub, BANK, other, "AG-E2E-2", clock, timeout_s=CALL_S,
                                 opening_balance_fen=500_000)
        records = st.sql("SELECT COUNT(*) FROM agreement_records")[0][0]
        again = link_ops.sign_at_counter(st.bank, st.stub, BANK, acct, "AG-E2E-1", clock, timeout_s=CALL_S,
                                         opening_balance_fen=500_000)
        assert again.replayed and st.sql("SELECT COUNT(*) FROM agreement_records")[0][0] == records
        # Another bank sees nothing and cannot end it (as if there were no agreement).
        assert list(st.utility.ListAgreements(pb.ListAgreementsRequest(account_no=acct), timeout=CALL_S,
                                              metadata=abc).agreements) == []
        assert _code(st.utility.EndAgreement, pb.EndAgreementRequest(end_serial="X-1", account_no=acct),
                     timeout=CALL_S, metadata=abc) == (grpc.StatusCode.NOT_FOUND, "AGREEMENT_NOT_FOUND")

        # The next issued bill is fed to the bank and debited from the passbook.
        run("mis_adapter", "issue-bills", "--db", st.mis_db, "--period", "202611", "--clock-start", CLOCK_START)
        (bill_id, amount), = st.sql("SELECT bill_id, amount_fen FROM bills WHERE account_no = :a AND "
                                    "period = '202611'", a=acct)
        assert st.sql("SELECT amount_fen FROM feed_outbox WHERE bank_id = :b AND bill_id = :i", b=BANK,
                      i=bill_id) == [(amount,)]
        st.autodebit(st.last_seq())
        assert st.sql("SELECT status FROM bills WHERE bill_id = :i", i=bill_id)[0][0] == "PAID"
        with st.bank.connect() as conn:
            assert ledger.balance_fen(conn, BANK, acct) == 500_000 - amount

        ended = link_ops.end_at_counter(st.stub, acct, "END-E2E-1", timeout_s=CALL_S)
        assert (ended.replayed, ended.agreement.state) == (False, pb.AGREEMENT_STATE_ENDED)
        assert link_ops.end_at_counter(st.stub, acct, "END-E2E-1", timeout_s=CALL_S).replayed
        for a in (acct, other):
            st.add_reading(a, "202612")
        run("mis_adapter", "issue-bills", "--db", st.mis_db, "--period", "202612", "--clock-start", CLOCK_START)
        fed = {r[0] for r in st.sql("SELECT account_no FROM feed_outbox WHERE period = '202612'")}
        assert fed == {other}

        # Day end: sign-off through the bridge; a counter pay then settles tomorrow; sign-on: today again.
        assert "state=SIGNED_OFF" in run("bridge", "sign-off", "--target", st.bridge.grpc_addr, "--insecure")  # type: ignore[union-attr]
        assert _pay(st.stub, "E2E-P1", acct, 1_000).settlement_date == TOMORROW
        assert "state=SIGNED_ON" in run("bridge", "sign-on", "--target", st.bridge.grpc_addr, "--insecure")  # type: ignore[union-attr]
        assert _pay(st.stub, "E2E-P2", acct, 1_000).settlement_date == TODAY
        # Suspension (停工) overrides sign-on.
        run("mis_adapter", "bank", "suspend", BANK, "--db", st.mis_db, "--reason", "drill")
        assert _code(_pay, st.stub, "E2E-P3", acct, 1_000) == (grpc.StatusCode.UNAVAILABLE, "BANK_SUSPENDED")
        assert "suspended=true" in run("bridge", "sign-on", "--target", st.bridge.grpc_addr, "--insecure")  # type: ignore[union-attr]
        assert _code(_pay, st.stub, "E2E-P3", acct, 1_000) == (grpc.StatusCode.UNAVAILABLE, "BANK_SUSPENDED")
        run("mis_adapter", "bank", "resume", BANK, "--db", st.mis_db)
        assert _pay(st.stub, "E2E-P3", acct, 1_000).settlement_date == TODAY
    finally:
        st.stop()


def test_refund_once_across_kill_9_and_netted_in_reconciliation(tmp_path: Path) -> None:
    st = Stack(tmp_path)
    try:
        clock = make_clock(CLOCK_START)
        run("mis_adapter", "bank", "refund-mode", BANK, "refund", "--db", st.mis_db)
        (acct,) = st.free_accounts(1)
        link_ops.sign_at_counter(st.bank, st.stub, BANK, acct, "AG-R-1", clock, timeout_s=CALL_S,
                                 opening_balance_fen=500_000)
        run("mis_adapter", "issue-bills", "--db", st.mis_db, "--period", "202611", "--clock-start", CLOCK_START)
        (bill_id, amount), = st.sql("SELECT bill_id, amount_fen FROM bills WHERE account_no = :a AND "
                                    "period = '202611'", a=acct)
        assert st.sql("SELECT amount_fen FROM feed_outbox WHERE bill_id = :i", i=bill_id) == [(amount,)]
        # The household pays the new bill at another bank's counter before the auto-debit runs.
        st.utility.Pay(pb.PayRequest(bank_serial="ABC-COUNTER-1", account_no=acct, amount_fen=amount,
                                     outlet_code="OUT01", teller_id="T01", channel=pb.CHANNEL_COUNTER),
                       timeout=CALL_S, metadata=[("x-yindian-bank-id", "ABC")])
        st.autodebit(st.last_seq())
        (refund_id, refund_fen, state), = st.sql(
            "SELECT refund_id, amount_fen, state FROM refund_offers WHERE account_no = :a", a=acct)
        assert (refund_fen, state) == (amount, "OFFERED")
        with st.bank.connect() as conn:
            before = ledger.balance_fen(conn, BANK, acct)

        # The bank credits the passbook; both utility-side processes die before the acknowledgement.
        listed, credited, fen = link_ops.credit_refunds(st.bank, st.stub, BANK, clock, timeout_s=CALL_S)
        assert (credited, fen) == (1, amount) and listed >= 1
        st.kill9()
        st.start()
        r = link_ops.run_refunds(st.bank, st.stub, BANK, clock, timeout_s=CALL_S)
        assert (r.credited, r.acknowledged) == (0, 1)
        with st.bank.connect() as conn:
            assert ledger.balance_fen(conn, BANK, acct) == before + amount
        assert st.sql("SELECT state, settlement_date FROM refund_offers WHERE refund_id = :i", i=refund_id)[0][0] == \
            "ACKNOWLEDGED"
        assert link_ops.run_refunds(st.bank, st.stub, BANK, clock, timeout_s=CALL_S).acknowledged == 0

        # The day's reconciliation nets the refund: what the bank owes is the day's payments less it.
        posted = int(st.sql("SELECT SUM(amount_fen) FROM payments WHERE bank_id = :b AND state = 'POSTED' "
                            "AND settlement_date = :d", b=BANK, d=TODAY)[0][0])
        out = run("bank_sim", "reconcile", "--target", st.bridge.grpc_addr, "--db", st.bank_db,  # type: ignore[union-attr]
                  "--bank-id", BANK, "--date", TODAY, "--insecure")
        assert f"net_settlement_fen={posted - amount}" in out, out
        assert "refund_fen=" + str(amount) in out, out
    finally:
        st.stop()
