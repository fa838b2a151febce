"""Auto-debit through the real bill feed in the chaos soak: the utility
issues bills in tranches while the soak runs (`mis_adapter bench-data
populate|issue`, through the CLI: bank_sim imports nothing of the servers),
and the bank's own auto-debit worker (`python -m bank_sim autodebit`, a
process of its own, with its own database of passbooks) takes them from the
feed through the bridge, debits the passbooks and answers. The soak kills
that worker (-9) as one of its faults (`kill_bank`) and starts it again.

After quiescence every notice must be acknowledged; then the feed is
checked from the bank's ledger and the MIS independently
(bank_sim.bench_feed.check_feed): every fed bill settled by exactly one
AUTO_DEBIT payment matching exactly one passbook debit, or in arrears with
INSUFFICIENT_FUNDS on both sides; no passbook debited twice."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bank_sim import ledger, mis_tables
from bank_sim.bench_feed import FeedCheck, check_feed, open_passbooks
from bank_sim.processes import run_command
from yindian.v1 import billing_pb2 as pb
from yindian_common.db import make_engine
from yindian_common.fields import make_account_no

FEED_BRANCH = "98"           # households of their own: the counter traffic never touches them
FEED_TRANCHES = 8
FEED_TRANCHE_ACCOUNTS = 60
CLI_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
ACK_TIMEOUT_S = 300.0
POLL_S = 0.5


def feed_period(today: dt.date) -> str:
    """The period the tranches' bills are issued for: one the seed leaves without readings, so
    that only the tranches' households are billed. The seed leaves today's month's readings
    unbilled (`mis_adapter seed`), for every household the counters pay; a fixed period became
    that month when the clock reached it (and the tranches' issue then billed every household,
    applying the counters' prepaid credit to new bills). Two months on, not one: a run started
    just before midnight on a month's last day seeds in the next month."""
    y, m = divmod(today.year * 12 + today.month - 1 + 2, 12)
    return f"{y:04d}{m + 1:02d}"


@dataclass
class FeedSide:
    work: Path
    mis_db: str
    bank_id: str
    target: str                     # the bridge's address
    period: str                     # feed_period of the day the run starts
    bank_db: str = ""
    worker: subprocess.Popen[bytes] | None = None
    issued: int = 0
    kills: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.bank_db = f"sqlite:///{self.work / 'bank.db'}"

    def start_worker(self) -> None:
        log = open(self.work / "autodebit.log", "a")  # noqa: SIM115 - handed to the child
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "bank_sim", "autodebit", "--target", self.target, "--db", self.bank_db,
             "--bank-id", self.bank_id, "--insecure", "--silence-s", "3", "--retry-backoff-cap-s", "0.5"],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill_worker(self) -> None:
        """kill -9 of the bank's auto-debit worker, then a fresh one."""
        if self.worker is not None and self.worker.poll() is None:
            self.worker.kill()
            self.worker.wait(STOP_TIMEOUT_S)
        self.kills += 1
        self.start_worker()

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait(STOP_TIMEOUT_S)

    def issue_tranche(self, k: int) -> None:
        """Households of tranche `k` with passbooks at the bank, then their bills issued and fed."""
        with self._lock:
            first = 1 + k * FEED_TRANCHE_ACCOUNTS
            accounts = [make_account_no(FEED_BRANCH, first + i) for i in range(FEED_TRANCHE_ACCOUNTS)]
            bank = make_engine(self.bank_db, pool_size=1)
            try:
                open_passbooks(bank, self.bank_id, accounts, now=dt.datetime.now(dt.UTC), rng_seed=k)
            finally:
                bank.dispose()
            common = ["mis_adapter", "bench-data"]
            run_command("feed-populate", [*common, "populate", "--db", self.mis_db, "--period", self.period,
                                          "--accounts", str(FEED_TRANCHE_ACCOUNTS), "--first-serial", str(first),
                                          "--branch", FEED_BRANCH, "--banks", self.bank_id],
                        log_dir=self.work, timeout_s=CLI_TIMEOUT_S)
            run_command("feed-issue", [*common, "issue", "--db", self.mis_db, "--period", self.period],
                        log_dir=self.work, timeout_s=CLI_TIMEOUT_S)
            self.issued += FEED_TRANCHE_ACCOUNTS

    def wait_acknowledged(self) -> bool:
        """Until the utility's cursor covers every notice it fed the bank (bounded); then stops the worker."""
        eng = make_engine(self.mis_db, pool_size=1)
        ob, cur = mis_tables.feed_outbox, mis_tables.feed_cursors
        try:
            t_end = time.monotonic() + ACK_TIMEOUT_S
            while time.monotonic() < t_end:
                if self.worker is not None and self.worker.poll() is not None:
                    self.start_worker()  # it must not have stopped on its own; keep the feed going anyway
                with eng.connect() as conn:
                    fed = conn.execute(sa.select(sa.func.max(ob.c.seq)).where(ob.c.bank_id == self.bank_id)
                                       ).scalar_one_or_none()
                    acked = conn.execute(sa.select(cur.c.acked_through_seq).where(cur.c.bank_id == self.bank_id)
                                         ).scalar_one_or_none()
                if fed is not None and acked is not None and int(acked) >= int(fed):
                    return True
                time.sleep(POLL_S)  # polling another process's database: nothing to wait on
            return False
        finally:
            eng.dispose()
            self.stop_worker()

    def check(self) -> FeedCheck:
        mis, bank = make_engine(self.mis_db, pool_size=1), make_engine(self.bank_db, pool_size=1)
        try:
            return check_feed(mis, bank, self.bank_id, self.period)
        finally:
            mis.dispose()
            bank.dispose()

    def bank_records(self) -> list[pb.BankRecord]:
        """The bank's auto-debits, for its end-of-day reconciliation file."""
        eng = make_engine(self.bank_db, pool_size=1)
        led = ledger.ledger.c
        try:
            with eng.connect() as conn:
                rows = conn.execute(sa.select(led.bank_serial, led.account_no, led.amount_fen).where(
                    led.bank_id == self.bank_id, led.channel == "AUTO_DEBIT")).all()
        except sa.exc.OperationalError:  # no tranche was issued: the bank's tables do not exist
            return []
        finally:
            eng.dispose()
        return [pb.BankRecord(bank_serial=s, account_no=a, amount_fen=int(f), status=pb.BANK_RECORD_STATUS_POSTED)
                for s, a, f in rows]
