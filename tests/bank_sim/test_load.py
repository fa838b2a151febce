"""The load generator against a tiny in-test BillingService: open-loop arrivals
(latency from the intended send time, arrivals never wait for completions),
the concurrency bound (drops counted), warm-up excluded, same-serial retries
of in-doubt pays, cancels of the run's own pays, and the correctness check
failing when a payment disappears. Real gRPC on loopback, no mocks."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from bank_sim import load
from bank_sim.histogram import LatencyHistogram
from bank_sim.load import LoadProfile, LoadResult, RunLedger
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc as pbg
from yindian_common.fields import make_account_no

pytestmark = pytest.mark.timeout(60)

ACCOUNTS = [make_account_no("01", n) for n in range(1, 21)]


@dataclass
class StoredPay:
    account_no: str
    amount_fen: int
    state: str  # POSTED, REVERSED, TOMBSTONE


class FakeBilling(pbg.BillingServiceServicer):
    """An in-memory utility: idempotent Pay by serial, Cancel with tombstones, GetPayment.
    `service_s` makes every call that slow; `lose_every` applies every n-th new pay but
    loses its answer (UNAVAILABLE), as a broken link would."""

    def __init__(self, *, service_s: float = 0.0, lose_every: int = 0) -> None:
        self.service_s = service_s
        self.lose_every = lose_every
        self.lock = threading.Lock()
        self.payments: dict[str, StoredPay] = {}
        self.applied: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.cancels: dict[str, str] = {}  # cancel serial -> original serial

    def _enter(self, rpc: str) -> None:
        with self.lock:
            self.calls[rpc] += 1
        if self.service_s:
            time.sleep(self.service_s)  # a slow server, not synchronisation

    def QueryAccount(self, request: pb.QueryAccountRequest, context: grpc.ServicerContext) -> pb.QueryAccountResponse:
        self._enter("QueryAccount")
        return pb.QueryAccountResponse(account_no=request.account_no, arrears_fen=100, total_due_fen=100)

    def Pay(self, request: pb.PayRequest, context: grpc.ServicerContext) -> pb.PayResponse:
        self._enter("Pay")
        with self.lock:
            have = self.payments.get(request.bank_serial)
            if have is None:
                self.payments[request.bank_serial] = StoredPay(request.account_no, request.amount_fen, "POSTED")
                self.applied[request.bank_serial] += 1
                lose = self.lose_every and len(self.applied) % self.lose_every == 0
            elif have.state == "TOMBSTONE":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "serial reversed")
            elif (have.account_no, have.amount_fen) != (request.account_no, request.amount_fen):
                context.abort(grpc.StatusCode.ALREADY_EXISTS, "serial reused")
            else:
                lose = False
        if lose:
            context.abort(grpc.StatusCode.UNAVAILABLE, "answer lost on the link")
        return pb.PayResponse(bank_serial=request.bank_serial, account_no=request.account_no,
                              amount_fen=request.amount_fen, settlement_date="2026-11-28")

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        self._enter("Cancel")
        with self.lock:
            self.cancels[request.cancel_serial] = request.original_serial
            have = self.payments.get(request.original_serial)
            if have is None:
                self.payments[request.original_serial] = StoredPay("", request.amount_fen, "TOMBSTONE")
                outcome = pb.CANCEL_OUTCOME_ORIGINAL_NOT_FOUND
            else:
                have.state = "REVERSED"
                outcome = pb.CANCEL_OUTCOME_REVERSED
        return pb.CancelResponse(outcome=outcome, cancel_serial=request.cancel_serial,
                                 original_serial=request.original_serial)

    def GetPayment(self, request: pb.GetPaymentRequest, context: grpc.ServicerContext) -> pb.GetPaymentResponse:
        self._enter("GetPayment")
        with self.lock:
            have = self.payments.get(request.bank_serial)
        if have is None:
            return pb.GetPaymentResponse(state=pb.PAYMENT_STATE_NOT_FOUND)
        state = {"POSTED": pb.PAYMENT_STATE_POSTED, "REVERSED": pb.PAYMENT_STATE_REVERSED,
                 "TOMBSTONE": pb.PAYMENT_STATE_REFUSED}[have.state]
        return pb.GetPaymentResponse(state=state, payment=pb.PayResponse(
            bank_serial=request.bank_serial, account_no=have.account_no, amount_fen=have.amount_fen))


def serve(fake: FakeBilling, workers: int = 8) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pbg.add_BillingServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def fake_target(request: pytest.FixtureRequest) -> Iterator[tuple[FakeBilling, str]]:
    kwargs: dict[str, Any] = getattr(request, "param", {})
    workers = kwargs.pop("workers", 8)
    fake = FakeBilling(**kwargs)
    server, target = serve(fake, workers)
    yield fake, target
    server.stop(0)


def profile(target: str, **kw: Any) -> LoadProfile:
    base: dict[str, Any] = dict(target=target, insecure=True, bank_id="ICBC", rate_per_s=100.0, duration_s=0.5,
                                warmup_s=0.0, concurrency=64, mix="query=1", progress=False, rpc_deadline_s=10.0,
                                retry_backoff_base_s=0.01, retry_backoff_cap_s=0.05, drain_s=20.0)
    base.update(kw)
    return LoadProfile(**base)


def run(p: LoadProfile) -> tuple[LoadResult, RunLedger]:
    return asyncio.run(load.run_load_async(p, ACCOUNTS))


# ---- profile and safety ----

def test_mix_is_parsed_into_shares_and_bad_mixes_are_refused() -> None:
    assert load.parse_mix("query=2,pay=1,cancel=1") == {"query": 0.5, "pay": 0.25, "cancel": 0.25, "autodebit": 0.0}
    for bad in ("query=1,transfer=1", "pay", "pay=-1", "pay=x", "pay=0", "pay=1,pay=2"):
        with pytest.raises(ValueError, match="mix"):
            load.parse_mix(bad)


def test_profile_refuses_unbounded_runs_and_bad_serial_prefixes() -> None:
    with pytest.raises(ValueError, match="arrivals"):
        profile("127.0.0.1:1", rate_per_s=50_000, duration_s=3_600)
    with pytest.raises(ValueError):
        profile("127.0.0.1:1", serial_prefix="bad_prefix")
    with pytest.raises(ValueError):
        profile("127.0.0.1:1", concurrency=0)


def test_non_loopback_target_is_refused_unless_allowed() -> None:
    with pytest.raises(SystemExit, match="allow-host"):
        run(profile("10.1.2.3:50052"))
    with pytest.raises(SystemExit, match="allow-host"):
        load.main(["--target", "bank.example:50052", "--insecure", "--roster", "x.csv", "--no-progress"])
    load.check_target_allowed("bank.example:50052", ["bank.example"])  # allowed: no exception


# ---- open loop ----

@pytest.mark.parametrize("fake_target", [{"service_s": 0.02, "workers": 1}], indirect=True)
def test_arrivals_do_not_wait_for_a_slow_server_and_queueing_is_measured(fake_target: tuple[FakeBilling, str]) -> None:
    """One server thread at 20 ms a call carries 50 calls/s; 100 arrivals come in 1 s. The
    generator still sends all of them on time, and the last ones, queued behind the others
    for at least a second, show it: a closed loop would have reported 20 ms."""
    fake, target = fake_target
    result, _ = run(profile(target, rate_per_s=100.0, duration_s=1.0, concurrency=1_000))
    assert result.arrivals == 100 and result.issued == 100 and result.dropped == 0
    assert fake.calls["QueryAccount"] == 100
    assert result.codes == {"OK": 100}
    # 100 calls x 20 ms on one thread end >= 2 s after the start; the last was due at 0.99 s.
    assert result.latency.slowest_ms >= 900
    assert result.latency.p50_ms > 20


@pytest.mark.parametrize("fake_target", [{"service_s": 2.0}], indirect=True)
def test_arrivals_finding_no_free_slot_are_dropped_and_counted(fake_target: tuple[FakeBilling, str]) -> None:
    fake, target = fake_target
    result, _ = run(profile(target, rate_per_s=100.0, duration_s=0.5, concurrency=5))
    assert result.arrivals == 50
    assert (result.issued, result.dropped) == (5, 45)
    assert result.codes == {"OK": 5, "DROPPED": 45}
    assert fake.calls["QueryAccount"] == 5
    assert not result.sustained(p99_max_ms=1e9)


def test_warm_up_runs_but_is_not_measured(fake_target: tuple[FakeBilling, str]) -> None:
    fake, target = fake_target
    result, _ = run(profile(target, rate_per_s=100.0, warmup_s=0.5, duration_s=0.5))
    assert fake.calls["QueryAccount"] == 100
    assert result.arrivals == 50 and result.completed == 50 and result.latency.count == 50
    # the rate is the measured calls' over the measured span (not whether the box kept up with 100/s: on a
    # loaded CI box the last answer can come late, and a 0.5 s window's rate is then below 95 % of the offer)
    assert result.dropped == 0 and result.ok == 50
    assert result.rate_per_s == round(50 / result.span_s, 1)


# ---- pays, cancels, in doubt ----

@pytest.mark.parametrize("fake_target", [{"lose_every": 3}], indirect=True)
def test_in_doubt_pays_are_retried_with_the_same_serial_and_applied_once(fake_target: tuple[FakeBilling, str]
                                                                        ) -> None:
    fake, target = fake_target
    result, ledger = run(profile(target, rate_per_s=100.0, duration_s=0.6, mix="pay=3,autodebit=1"))
    assert result.pays_sent == 60 and result.pays_accepted == 60
    assert result.retries >= 20  # every third answer was lost
    assert result.codes == {"OK": 60}
    assert set(fake.applied) == set(ledger.pays) and set(fake.applied.values()) == {1}
    assert {r.channel for r in ledger.pays.values()} == {"COUNTER", "AUTO_DEBIT"}
    assert len(set(ledger.pays)) == 60 and all(len(s) <= 32 for s in ledger.pays)
    assert result.check is not None and result.check.ok, result.check


def test_cancels_reverse_earlier_accepted_pays_of_the_run(fake_target: tuple[FakeBilling, str]) -> None:
    fake, target = fake_target
    result, ledger = run(profile(target, rate_per_s=100.0, duration_s=1.0, mix="pay=2,cancel=1", seed=7))
    cancelled = {s for s, r in ledger.pays.items() if r.cancel == load.CANCEL_REVERSED}
    assert cancelled and set(fake.cancels.values()) == cancelled
    assert {s for s, p in fake.payments.items() if p.state == "REVERSED"} == cancelled
    check = result.check
    assert check is not None and check.ok, check
    assert check.cancelled == len(cancelled)
    assert check.mis_posted_fen == check.accepted_fen - check.cancelled_fen


def test_the_check_fails_when_a_payment_disappears(fake_target: tuple[FakeBilling, str]) -> None:
    fake, target = fake_target
    p = profile(target, rate_per_s=100.0, duration_s=0.5, mix="pay=1")
    result, ledger = run(p)
    assert result.check is not None and result.check.ok
    victim = next(iter(ledger.pays))
    with fake.lock:
        del fake.payments[victim]
    check = load.check_ledger(p, ledger)
    assert not check.ok
    kinds = {(d.kind, d.bank_serial) for d in check.discrepancies}
    assert ("MISSING", victim) in kinds and ("SUM_MISMATCH", "*") in kinds
    assert check.accepted_fen - check.mis_posted_fen == ledger.pays[victim].amount_fen


# ---- command line ----

def test_cli_writes_json_and_a_ledger_and_recheck_exits_non_zero_on_a_lost_payment(
        fake_target: tuple[FakeBilling, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake, target = fake_target
    roster = tmp_path / "ICBC.csv"
    roster.write_text("account_no\n" + "\n".join(ACCOUNTS) + "\n", encoding="utf-8")
    out, saved = tmp_path / "result.json", tmp_path / "ledger.jsonl"
    rc = load.main(["--target", target, "--bank-id", "ICBC", "--roster", str(roster), "--rate", "100",
                    "--duration", "0.5", "--warmup", "0.2", "--concurrency", "16", "--mix", "query=1,pay=1",
                    "--insecure", "--no-progress", "--json", str(out), "--save-ledger", str(saved)])
    assert rc == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["arrivals"] == 50 and doc["check"]["ok"] is True
    assert set(doc["ops"]) == {"query", "pay"}
    assert {"p50_ms", "p90_ms", "p99_ms", "p999_ms", "fastest_ms", "slowest_ms", "mean_ms"} <= set(doc["latency"])
    printed = capsys.readouterr().out
    assert "status code distribution" in printed and "check (GetPayment): OK" in printed

    victim = next(s for s, r in RunLedger.load(saved).pays.items() if r.outcome == load.ACCEPTED)
    with fake.lock:
        fake.payments[victim].amount_fen += 1  # altered, not deleted
    rc = load.main(["--check-ledger", str(saved), "--target", target, "--insecure"])
    assert rc == 1
    printed = capsys.readouterr().out
    assert f"WRONG_AMOUNT serial={victim}" in printed and "SUM_MISMATCH" in printed


def test_a_dead_target_ends_the_run_by_itself_with_every_pay_reported_in_doubt() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
    p = profile(target, rate_per_s=20.0, duration_s=0.5, mix="pay=1", rpc_deadline_s=0.5, drain_s=1.0,
                resolve_s=1.0, retry_max_attempts=3)
    result, ledger = run(p)
    assert result.pays_sent == 10 and result.pays_accepted == 0 and result.pays_in_doubt_after_run == 10
    assert result.codes == {"UNAVAILABLE": 10}
    check = result.check
    assert check is not None and not check.ok
    assert {d.kind for d in check.discrepancies} == {"PAY_IN_DOUBT"}
    assert {d.bank_serial for d in check.discrepancies} == set(ledger.pays)


def test_latency_histogram_summarises_clamps_and_merges() -> None:
    h = LatencyHistogram(latency_max_s=1.0)
    for ms in range(1, 101):  # 1..100 ms
        h.record_s(ms / 1000)
    h.record_s(5.0)  # beyond the range: clamped to 1 s and counted
    s = h.summary()
    assert (s.count, s.clamped) == (101, 1)
    assert s.fastest_ms == pytest.approx(1.0, rel=1e-3) and s.slowest_ms == pytest.approx(1000.0, rel=1e-3)
    assert s.p50_ms == pytest.approx(51.0, rel=1e-2) and s.p99_ms == pytest.approx(100.0, rel=1e-2)
    assert s.mean_ms == pytest.approx((5050 + 1000) / 101, rel=1e-3)
    other = LatencyHistogram(latency_max_s=1.0)
    other.record_s(0.2)
    h.merge(other)
    assert h.count == 102 and h.summary().clamped == 1
    assert LatencyHistogram(1.0).summary().count == 0 and LatencyHistogram(1.0).encode() == ""


def test_the_public_surface_is_what_bench_and_bench_core_import() -> None:
    assert set(load.__all__) == {"CheckResult", "Discrepancy", "LoadProfile", "LoadResult", "RunLedger",
                                 "check_ledger", "main", "parse_mix", "run_load", "run_load_async"}
    assert all(hasattr(load, name) for name in load.__all__)
