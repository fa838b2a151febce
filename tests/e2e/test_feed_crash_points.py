"""The bill feed's two crash points (yindian_common.crash_points), each hit
for real: mis_adapter → bridge → bank_sim autodebit on loopback, the armed
process SIGKILLs itself at its point on the first batch, is started again
unarmed, and the feed runs to its end. Then, checked from the bank's ledger
and the MIS independently (bank_sim.bench_feed.check_feed): every fed bill
is settled by exactly one AUTO_DEBIT payment matching exactly one passbook
debit (or is in arrears with INSUFFICIENT_FUNDS on both sides), the cursor
covers every notice, and every passbook balances.

- mis.feed_after_post: a result batch is posted in the MIS's transaction,
  the cursor not yet moved: nothing of it commits; the bank's results are
  redelivered and answered from its stored results, never debited again.
- bank.after_debit: the bank committed its debits, the results not yet
  sent: after the restart the redelivered notices are answered from
  `autodebit_results` with the same serials."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_feed_e2e import CLOCK_START, FEED_FLAGS, bank_last_seq, databases, prepare, verify
from tests.support import procs
from yindian_common.ports import stable_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(400)]

BILLS = 600
SMALL = ["--feed-window-max", "100", "--feed-notice-batch-max", "50"]
CRASH_WAIT_S = 120.0
RUN_WAIT_S = 300.0


def start_adapter(db: str, listen: str, log_dir: Path, crash_point: str = "") -> procs.Proc:
    return procs.start("mis_adapter", ["mis_adapter", "serve", "--db", db, "--listen", listen, "--metrics-port",
                                       "0", "--insecure", "--clock-start", CLOCK_START, *FEED_FLAGS, *SMALL],
                       env={"YINDIAN_CRASH_POINT": crash_point} if crash_point else None, log_dir=log_dir)


def start_bridge(upstream: str, db: str, log_dir: Path) -> procs.Proc:
    return procs.start("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", upstream, "--db", db,
                                  "--bank-id", "ICBC", "--metrics-port", "0", "--insecure",
                                  "--clock-start", CLOCK_START], log_dir=log_dir)


def start_autodebit(target: str, db: str, log_dir: Path, crash_point: str = "") -> subprocess.Popen[str]:
    log = open(log_dir / "autodebit.log", "a")  # noqa: SIM115 - the child owns it
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if crash_point:
        env["YINDIAN_CRASH_POINT"] = crash_point
    return subprocess.Popen(
        [sys.executable, "-m", "bank_sim", "autodebit", "--target", target, "--db", db, "--bank-id", "ICBC",
         "--insecure", "--clock-start", CLOCK_START, "--idle-exit-s", "3", "--idle-exit-after-seq", str(BILLS),
         "--silence-s", "3", "--retry-backoff-cap-s", "0.5", "--run-timeout-s", "280"],
        cwd=procs.REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_mis_killed_after_posting_a_result_batch_before_the_cursor(backend: str, tmp_path: Path) -> None:
    with databases(backend, tmp_path) as (mis_url, bank_url, bridge_url):
        prepare(mis_url, bank_url, BILLS)
        adapter = start_adapter(mis_url, f"127.0.0.1:{stable_port()}", tmp_path, crash_point="mis.feed_after_post")
        bridge = start_bridge(adapter.grpc_addr, bridge_url, tmp_path)
        consumer = start_autodebit(bridge.grpc_addr, bank_url, tmp_path)
        try:
            assert adapter.popen.wait(timeout=CRASH_WAIT_S) == -9, "mis_adapter did not crash at its point"
            debited_before_restart = bank_last_seq(bank_url)
            assert debited_before_restart > 0  # the bank had answered the batch the MIS died posting
            adapter = start_adapter(mis_url, adapter.grpc_addr, tmp_path)
            assert consumer.wait(timeout=RUN_WAIT_S) == 0, (tmp_path / "autodebit.log").read_text()[-3000:]
        finally:
            if consumer.poll() is None:
                consumer.kill()
            bridge.terminate()
            adapter.terminate()
        verify(mis_url, bank_url, BILLS)


def test_bank_killed_after_debiting_before_sending_results(tmp_path: Path) -> None:
    with databases("sqlite", tmp_path) as (mis_url, bank_url, bridge_url):
        prepare(mis_url, bank_url, BILLS)
        adapter = start_adapter(mis_url, "127.0.0.1:0", tmp_path)
        bridge = start_bridge(adapter.grpc_addr, bridge_url, tmp_path)
        consumer = start_autodebit(bridge.grpc_addr, bank_url, tmp_path, crash_point="bank.after_debit")
        try:
            assert consumer.wait(timeout=CRASH_WAIT_S) == -9, (tmp_path / "autodebit.log").read_text()[-3000:]
            assert bank_last_seq(bank_url) > 0  # the passbooks were debited and committed before the crash
            consumer = start_autodebit(bridge.grpc_addr, bank_url, tmp_path)
            assert consumer.wait(timeout=RUN_WAIT_S) == 0, (tmp_path / "autodebit.log").read_text()[-3000:]
        finally:
            if consumer.poll() is None:
                consumer.kill()
            bridge.terminate()
            adapter.terminate()
        verify(mis_url, bank_url, BILLS)
