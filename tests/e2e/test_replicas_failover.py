"""Acceptance (issue 10): two mis_adapter replicas behind one bridge
(`--upstream A --upstream B`), one killed (-9) mid-load.

Real processes on loopback over one seeded MIS: the bank core's tellers pay
through the bridge (retrying the same serial until the answer is definite)
while its auto-debit consumer answers the bill feed through the same bridge
(each notice answered once by seq, a redelivered one from its stored answer).
Replica A, which serves both, is killed mid-load. Then: every pay the bank
saw succeed is POSTED exactly once, every other one is definitely not applied
and absent from the MIS; the feed moved to replica B by itself and its cursor
reached the last notice; every notice has exactly one stored result and every
debit exactly one payment."""
from __future__ import annotations

import queue
import random
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from tests.e2e.test_kill_adapter import Ledger, money_in_mis, pay_until_definite, wait_until
from tests.support.databases import fresh_database
from tests.support.procs import REPO, Proc, start
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

BANK = "ICBC"
CLOCK = "2026-11-28T09:00:00+08:00"
PERIOD = "202611"
ACCOUNTS = 600
TELLERS = 4
PAYS_BEFORE_KILL = 30
PAYS_AFTER_KILL = 30
LEASE_TTL_S = "2.0"


class FeedConsumer:
    """The bank core's auto-debit side, minimal: answers each notice once, by seq;
    a redelivered notice gets its stored answer again."""

    def __init__(self, target: str, hold_after: int) -> None:
        self.hold_after = hold_after  # answers this many, then waits for `go` (notices stay outstanding)
        self.go = threading.Event()
        self.answers: dict[int, pb.DebitResult] = {}
        self.seen = 0
        self.cursor = 0
        self.error: grpc.RpcError | None = None
        self._q: queue.Queue[pb.BillFeedRequest | None] = queue.Queue()
        self._q.put(pb.BillFeedRequest(subscribe=pb.Subscribe()))
        self._ch = grpc.insecure_channel(target)
        self._call = billing_pb2_grpc.BillingServiceStub(self._ch).BillFeed(
            iter(self._q.get, None), metadata=[("x-yindian-bank-id", BANK)], timeout=180)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            for msg in self._call:
                if msg.WhichOneof("body") == "heartbeat":
                    self.cursor = msg.heartbeat.acked_through_seq
                    continue
                batch = []
                for n in msg.notices.notices:
                    self.seen += 1
                    if n.seq not in self.answers:
                        ok = n.seq % 4 != 0  # every fourth passbook is short
                        self.answers[n.seq] = pb.DebitResult(
                            seq=n.seq, amount_fen=n.amount_fen, bank_serial=f"AD-{n.seq}" if ok else "",
                            outcome=pb.DEBIT_OUTCOME_DEBITED if ok else pb.DEBIT_OUTCOME_INSUFFICIENT_FUNDS)
                    batch.append(self.answers[n.seq])
                if len(self.answers) >= self.hold_after:
                    self.go.wait(120)  # the kill lands mid-feed, with notices outstanding
                self._q.put(pb.BillFeedRequest(results=pb.DebitResultBatch(results=batch)))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                self.error = exc

    def close(self) -> None:
        self._q.put(None)
        self._call.cancel()
        self._ch.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_replicas_one_killed_mid_load(backend: str, tmp_path: Path) -> None:
    with fresh_database(backend, tmp_path, "mis", schema="mis") as mis_db:
        journal_db = f"sqlite:///{tmp_path / 'bridge.db'}"
        subprocess.run([sys.executable, "-m", "mis_adapter", "seed", "--db", mis_db, "--accounts", str(ACCOUNTS),
                        "--roster-dir", str(tmp_path / "rosters"), "--clock-start", CLOCK], cwd=REPO, check=True,
                       timeout=120, capture_output=True)
        subprocess.run([sys.executable, "-m", "mis_adapter", "issue-bills", "--db", mis_db, "--period", PERIOD,
                        "--clock-start", CLOCK], cwd=REPO, check=True, timeout=120, capture_output=True)
        mis = make_engine(mis_db, pool_size=2)
        with mis.connect() as conn:
            accounts = [r[0] for r in conn.execute(sa.text("SELECT account_no FROM customers WHERE status = 'OPEN'"))]
            notices = int(conn.execute(sa.text("SELECT COUNT(*) FROM feed_outbox WHERE bank_id = :b"),
                                       {"b": BANK}).scalar_one())
        assert notices > 60
        money_before = money_in_mis(mis)
        replica_args = ["mis_adapter", "serve", "--db", mis_db, "--metrics-port", "0", "--insecure",
                        "--listen", "127.0.0.1:0", "--clock-start", CLOCK, "--feed-lease-ttl-s", LEASE_TTL_S,
                        "--feed-heartbeat-s", "0.5", "--feed-poll-interval-s", "0.1", "--feed-notice-batch-max", "5"]
        a: Proc = start("replica-a", replica_args, log_dir=tmp_path)
        b: Proc = start("replica-b", replica_args, log_dir=tmp_path)
        bridge = start("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", a.grpc_addr,
                                  "--upstream", b.grpc_addr, "--db", journal_db, "--bank-id", BANK,
                                  "--metrics-port", "0", "--insecure", "--clock-start", CLOCK,
                                  "--resolver-idle-wait-s", "0.1", "--resolver-backoff-cap-s", "1.0",
                                  "--upstream-deadline-cap-s", "2.0", "--upstream-health-interval-s", "0.2",
                                  "--feed-failover-retry-s", "0.2"], log_dir=tmp_path)
        ledger, stop = Ledger(), threading.Event()

        def teller(n: int) -> None:
            rng = random.Random(n)
            with grpc.insecure_channel(bridge.grpc_addr) as ch:
                stub = billing_pb2_grpc.BillingServiceStub(ch)
                i = 0
                while not stop.is_set():
                    i += 1
                    req = pb.PayRequest(bank_serial=f"R{n}-{i}", account_no=rng.choice(accounts),
                                        amount_fen=rng.randint(100, 60_000), outlet_code="OUT01",
                                        teller_id=f"T{n}", channel=pb.CHANNEL_COUNTER)
                    pay_until_definite(stub, req, ledger)

        threads = [threading.Thread(target=teller, args=(n,), daemon=True) for n in range(TELLERS)]
        consumer = FeedConsumer(bridge.grpc_addr, hold_after=20)
        try:
            for t in threads:
                t.start()
            wait_until(lambda: len(ledger.succeeded) >= PAYS_BEFORE_KILL and len(consumer.answers) >= 10,
                       "pays and notices before the kill")
            assert len(consumer.answers) < notices, "the feed ended before the kill: the test proves nothing"
            a.kill9()
            consumer.go.set()
            target = len(ledger.succeeded) + PAYS_AFTER_KILL
            wait_until(lambda: len(ledger.succeeded) >= target, "pays through the survivor", timeout_s=90)
            wait_until(lambda: consumer.cursor >= notices or consumer.error is not None,
                       "the feed to finish through the survivor", timeout_s=90)
            assert consumer.error is None, consumer.error
            stop.set()
            for t in threads:
                t.join(60)
            assert not ledger.gave_up
            assert any("event=feed_relay_moved" in line for line in bridge.output)

            journal = make_engine(journal_db, pool_size=1)
            in_doubt = sa.text("SELECT COUNT(*) FROM bridge_journal WHERE state IN ('PENDING','SUSPECT','REVERSING')")

            def resolved() -> bool:
                with journal.connect() as conn:
                    return int(conn.execute(in_doubt).scalar_one()) == 0
            wait_until(resolved, "the bridge to resolve every in-doubt pay")
            journal.dispose()

            with mis.connect() as conn:
                rows = conn.execute(sa.text("SELECT bank_serial, state, amount_fen, channel FROM payments "
                                            "WHERE bank_id = :b"), {"b": BANK}).all()
                results = conn.execute(sa.text("SELECT seq, outcome FROM feed_results WHERE bank_id = :b"),
                                       {"b": BANK}).all()
            counter = {r.bank_serial: (r.state, r.amount_fen) for r in rows if r.channel == "COUNTER"}
            for serial, amount in ledger.succeeded.items():
                assert counter.get(serial) == ("POSTED", amount), serial
            for serial, reason in ledger.failed.items():
                assert counter.get(serial, ("ABSENT", 0))[0] in ("ABSENT", "REVERSED", "TOMBSTONE"), (serial, reason)
            assert {s for s, (st, _) in counter.items() if st == "POSTED"} == set(ledger.succeeded)
            # the feed: every notice exactly one result, every debit exactly one payment
            assert sorted(r.seq for r in results) == list(range(1, notices + 1))
            debits = {f"AD-{r.seq}" for r in results if r.outcome == "DEBITED"}
            auto = [r.bank_serial for r in rows if r.channel == "AUTO_DEBIT"]
            assert sorted(auto) == sorted(debits)
            debit_fen = sum(consumer.answers[int(s[3:])].amount_fen for s in debits)
            assert money_in_mis(mis) - money_before == sum(ledger.succeeded.values()) + debit_fen
        finally:
            stop.set()
            consumer.close()
            mis.dispose()
            assert bridge.terminate() == 0
            b.terminate()
            if a.popen.poll() is None:
                a.terminate()
