"""The bill feed end to end with real processes on loopback: mis_adapter →
bridge → bank_sim autodebit, on SQLite and PostgreSQL.

- 100,000 bills issued, fed, debited and acknowledged: every bill is paid by
  exactly one AUTO_DEBIT payment that matches one bank debit, or is in
  arrears with INSUFFICIENT_FUNDS on both sides; counts and fen agree.
- kill -9 of mis_adapter, then the bridge, then bank_sim, each mid-stream:
  after restarts the same invariant holds and no passbook is debited twice.
- two mis_adapter replicas on one PostgreSQL: only one streams the bank;
  killing it moves the stream to the other without loss."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from bank_sim import autodebit
from bank_sim.bench_feed import check_feed, open_passbooks
from mis_adapter.bench_data import populate_period
from mis_adapter.issue_bills import issue_bills
from tests.support import procs
from tests.support.databases import fresh_database
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine
from yindian_common.ports import stable_port

pytestmark = pytest.mark.e2e

PERIOD = "202611"
CLOCK_START = "2026-11-28T12:00:00+08:00"
FEED_FLAGS = ["--feed-heartbeat-s", "0.3", "--feed-lease-ttl-s", "3", "--feed-poll-interval-s", "0.05"]
REPO = procs.REPO


def _clock() -> ManualClock:
    import datetime as dt
    return ManualClock(dt.datetime.fromisoformat(CLOCK_START))


def start_adapter(name: str, db: str, listen: str, log_dir: Path, extra: list[str] | None = None) -> procs.Proc:
    return procs.start(name, ["mis_adapter", "serve", "--db", db, "--listen", listen, "--metrics-port", "0",
                              "--insecure", "--clock-start", CLOCK_START, *FEED_FLAGS, *(extra or [])],
                       log_dir=log_dir)


def start_bridge(upstream: str, db: str, listen: str, log_dir: Path) -> procs.Proc:
    return procs.start("bridge", ["bridge", "serve", "--listen", listen, "--upstream", upstream, "--db", db,
                                  "--bank-id", "ICBC", "--metrics-port", "0", "--insecure",
                                  "--clock-start", CLOCK_START], log_dir=log_dir)


def start_autodebit(target: str, db: str, log_dir: Path, idle_exit_s: float = 2.0,
                    after_seq: int = 0) -> subprocess.Popen[str]:
    """The consumer exits once idle AND past `after_seq` (the bills the test issued):
    a stall on a loaded machine must not look like the end of the feed."""
    log = open(log_dir / "autodebit.log", "a")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "bank_sim", "autodebit", "--target", target, "--db", db, "--bank-id", "ICBC",
         "--insecure", "--clock-start", CLOCK_START, "--idle-exit-s", str(idle_exit_s),
         "--idle-exit-after-seq", str(after_seq), "--silence-s", "3",
         "--retry-backoff-cap-s", "0.5", "--run-timeout-s", "400"],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT, text=True)


@contextmanager
def databases(backend: str, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    with fresh_database(backend, tmp_path, "mis") as mis, fresh_database(backend, tmp_path, "bank") as bank, \
            fresh_database("sqlite", tmp_path, "bridge") as bridge_db:
        yield mis, bank, bridge_db


def prepare(mis_url: str, bank_url: str, n: int) -> None:
    mis = make_engine(mis_url)
    bank = make_engine(bank_url)
    people = populate_period(mis, n, PERIOD, now=_clock().now())
    open_passbooks(bank, "ICBC", [a for a, _ in people], now=_clock().now())
    issue_bills(mis, _clock(), PERIOD, batch_accounts=5_000)
    mis.dispose()
    bank.dispose()


def bank_last_seq(bank_url: str) -> int:
    eng = make_engine(bank_url)
    try:
        with eng.connect() as conn:
            return autodebit.last_seq(conn, "ICBC")
    except sa.exc.OperationalError:
        return 0
    finally:
        eng.dispose()


def wait_until(pred, what: str, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    done = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if pred():
            return
        done.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def verify(mis_url: str, bank_url: str, n: int) -> None:
    mis, bank = make_engine(mis_url), make_engine(bank_url)
    try:
        c = check_feed(mis, bank, "ICBC", PERIOD)
    finally:
        mis.dispose()
        bank.dispose()
    assert c.problems == [], c.problems[:10]
    assert c.bills == n and c.fed == n
    assert c.paid_by_debit + c.dunning == n
    assert c.paid_by_debit > 0 and c.dunning > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_100k_bills_fed_debited_and_acknowledged(backend: str, tmp_path: Path) -> None:
    n = int(os.environ.get("YINDIAN_FEED_E2E_BILLS", "100000"))
    with databases(backend, tmp_path) as (mis_url, bank_url, bridge_url):
        prepare(mis_url, bank_url, n)
        # Bigger messages than the defaults: the database work per message decides the pace.
        big = ["--feed-window-max", "4000", "--feed-notice-batch-max", "1000"]
        adapter = start_adapter("mis_adapter", mis_url, "127.0.0.1:0", tmp_path, big)
        bridge = start_bridge(adapter.grpc_addr, bridge_url, "127.0.0.1:0", tmp_path)
        try:
            consumer = start_autodebit(bridge.grpc_addr, bank_url, tmp_path, after_seq=n)
            assert consumer.wait(timeout=500) == 0, (tmp_path / "autodebit.log").read_text()[-3000:]
        finally:
            bridge.terminate()
            adapter.terminate()
        verify(mis_url, bank_url, n)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_each_process_mid_stream(backend: str, tmp_path: Path) -> None:
    # Each kill comes after `step` more notices; the feed must still be running at each. On a fast box the
    # consumer took 4,300 notices in the second between seeing its progress and the bridge's kill, and a
    # 6,000-bill feed was over before the bridge went down (nothing left to make progress with).
    n, step = 24_000, 2_000
    small = ["--feed-window-max", "300", "--feed-notice-batch-max", "100"]
    with databases(backend, tmp_path) as (mis_url, bank_url, bridge_url):
        prepare(mis_url, bank_url, n)
        adapter = start_adapter("mis_adapter", mis_url, f"127.0.0.1:{stable_port()}", tmp_path, small)
        bridge = start_bridge(adapter.grpc_addr, bridge_url, f"127.0.0.1:{stable_port()}", tmp_path)
        consumer = start_autodebit(bridge.grpc_addr, bank_url, tmp_path, idle_exit_s=3.0, after_seq=n)
        try:
            wait_until(lambda: bank_last_seq(bank_url) >= step, "the feed under way")
            adapter.kill9()
            adapter = start_adapter("mis_adapter", mis_url, adapter.grpc_addr, tmp_path, small)
            mark = bank_last_seq(bank_url)
            wait_until(lambda: bank_last_seq(bank_url) >= mark + step, "progress after mis_adapter restart")
            bridge.kill9()
            killed_at = bank_last_seq(bank_url)
            assert killed_at < n - step, f"the feed was at {killed_at} of {n} when the bridge was killed"
            bridge = start_bridge(adapter.grpc_addr, bridge_url, bridge.grpc_addr, tmp_path)
            wait_until(lambda: bank_last_seq(bank_url) >= killed_at + step, "progress after bridge restart")
            consumer.kill()
            consumer.wait(30)
            consumer = start_autodebit(bridge.grpc_addr, bank_url, tmp_path, idle_exit_s=3.0, after_seq=n)
            assert consumer.wait(timeout=300) == 0, (tmp_path / "autodebit.log").read_text()[-3000:]
        finally:
            if consumer.poll() is None:
                consumer.kill()
            bridge.terminate()
            adapter.terminate()
        verify(mis_url, bank_url, n)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_replicas_one_stream_and_failover(tmp_path: Path) -> None:
    """Two mis_adapter replicas on one PostgreSQL: while A streams the bank,
    B refuses a second subscriber; after kill -9 of A, B takes the stream
    once A's lease lapses and nothing is lost or applied twice."""
    import grpc

    from tests.mis_adapter.test_feed_support import RawFeed
    from yindian.v1 import billing_pb2_grpc
    from yindian_common.status import error_info

    n = 4_000
    small = ["--feed-window-max", "300", "--feed-notice-batch-max", "100"]
    with databases("postgresql", tmp_path) as (mis_url, bank_url, _bridge_url):
        prepare(mis_url, bank_url, n)
        a = start_adapter("replica_a", mis_url, "127.0.0.1:0", tmp_path, small)
        b = start_adapter("replica_b", mis_url, "127.0.0.1:0", tmp_path, small)
        consumer = start_autodebit(a.grpc_addr, bank_url, tmp_path, idle_exit_s=3.0, after_seq=n)
        try:
            wait_until(lambda: bank_last_seq(bank_url) >= 1, "A streaming")
            with grpc.insecure_channel(b.grpc_addr) as ch:
                err = RawFeed(billing_pb2_grpc.BillingServiceStub(ch), timeout_s=30).error()
            assert err.code() == grpc.StatusCode.ABORTED
            info = error_info(err)
            assert info is not None and info.reason == "FEED_ALREADY_ACTIVE"
            wait_until(lambda: bank_last_seq(bank_url) >= n // 3, "a third of the feed through A")
            a.kill9()
            consumer.kill()
            consumer.wait(30)
            consumer = start_autodebit(b.grpc_addr, bank_url, tmp_path, idle_exit_s=3.0, after_seq=n)
            assert consumer.wait(timeout=300) == 0, (tmp_path / "autodebit.log").read_text()[-3000:]
        finally:
            if consumer.poll() is None:
                consumer.kill()
            b.terminate()
            a.terminate()
        verify(mis_url, bank_url, n)


@pytest.mark.timeout(300)
def test_a_bank_that_stops_reading_through_the_bridge_holds_only_the_window(tmp_path: Path) -> None:
    """The bridge buffers nothing: a bank core that does not read (nor
    answer) gets exactly the adapter's window, then only heartbeats."""
    import grpc

    from tests.mis_adapter.test_feed_support import RawFeed, debited
    from yindian.v1 import billing_pb2_grpc

    window = ["--feed-window-max", "10", "--feed-notice-batch-max", "4"]
    with databases("sqlite", tmp_path) as (mis_url, bank_url, bridge_url):
        prepare(mis_url, bank_url, 60)
        adapter = start_adapter("mis_adapter", mis_url, "127.0.0.1:0", tmp_path, window)
        bridge = start_bridge(adapter.grpc_addr, bridge_url, "127.0.0.1:0", tmp_path)
        try:
            with grpc.insecure_channel(bridge.grpc_addr) as ch:
                feed = RawFeed(billing_pb2_grpc.BillingServiceStub(ch), timeout_s=120)
                assert feed.next_message().WhichOneof("body") == "heartbeat"
                # Not reading for a while: the adapter keeps heartbeating, sends nothing beyond the window.
                threading.Event().wait(2.0)
                ns = feed.notices(10)
                assert [n.seq for n in ns] == list(range(1, 11))
                for _ in range(5):
                    assert feed.next_message().WhichOneof("body") == "heartbeat"
                feed.send([debited(n) for n in ns])
                assert [n.seq for n in feed.notices(10)] == list(range(11, 21))
                feed.close()
        finally:
            bridge.terminate()
            adapter.terminate()
