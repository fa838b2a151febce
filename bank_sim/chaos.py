"""`python -m bank_sim chaos`: the seeded chaos soak. Real processes
(mis_adapter and the bridge started through their CLIs), a fault proxy on
the link between them, and a bank core that drives mixed operations through
the bridge while faults are injected on a schedule drawn from the seed:

- `kill_mis`, `kill_bridge`, `kill_bank` (the bank's auto-debit worker):
  SIGKILL the process, start it again;
- `link_blackhole` (for a while), `link_reset`, `link_cut` (after N bytes):
  through the fault proxy between bridge and mis_adapter;
- `short_deadline`: the next calls carry a deadline too short to finish.

Operations: query, pay, a retry of an earlier pay with the same serial and
request, a conflicting retry (same serial, another amount), a cancel of an
accepted pay. An in-doubt answer is resent with the same serial at
quiescence until definite. Meanwhile the utility issues bills in tranches
and the bank's auto-debit worker takes them through the real bill feed
(bank_sim.chaos_feed); its results are checked from both sides.

Continuous reconciliation runs throughout (control totals exchanged every
`--control-interval-s`, flagged after `--control-window-s`): both servers'
`yindian_control_total_divergence_fen` is sampled during the faults and
must stay 0, and exchanges must agree after quiescence. With `--tamper` the
time from the row change to the gauge going non-zero on each server is
printed.

After quiescence (faults healed, every in-doubt pay and cancel answered,
the bridge's journal settled) the day is reconciled through the bridge, and
the invariants are checked from three sources independently: the bank's
own ledger, the bridge's journal and the MIS (both read over SQL; bank_sim
imports nothing of either server). Exit 0 only if all hold.

The seed fixes the schedule (which operation at which index, which fault
after which operation, with which argument): the same seed replays it; the
timing of answers, and so the outcomes, may differ."""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import random
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from bank_sim import mis_tables
from bank_sim.chaos_feed import FEED_TRANCHES, FeedSide, feed_period
from bank_sim.control_watch import ControlWatch
from bank_sim.load.check import PayRecord, RunLedger, compare, read_mis
from bank_sim.load.profile import ACCEPTED, CANCEL_IN_DOUBT, CANCEL_NONE, CANCEL_REVERSED, PENDING, REFUSED
from bank_sim.processes import ServerProcess, run_command, start_server
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.clock import business_date, make_clock
from yindian_common.db import create_database, drop_database, make_engine, normalize_url
from yindian_common.fault_proxy import FaultProxy
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.ports import stable_port
from yindian_common.status import error_info

FAULT_KINDS = ("kill_mis", "kill_bridge", "kill_bank", "link_blackhole", "link_reset", "link_cut", "short_deadline")
DB_FAULT_KINDS = ("db_reset", "db_blackhole")  # with --mis-db-server: through a proxy between mis_adapter and its DB
IMMEDIATE_RESENDS = 3          # the teller's prompt resends of an in-doubt pay before moving on
RESEND_PAUSE_S = 0.05
# Auto-debit goes through the real bill feed (bank_sim.chaos_feed), not as pays on the AUTO_DEBIT channel.
OP_MIX = (("query", 15), ("pay", 55), ("retry", 12), ("conflict", 5), ("cancel", 13))
IN_DOUBT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
            grpc.StatusCode.CANCELLED}
UNSETTLED_JOURNAL_STATES = ("PENDING", "SUSPECT", "REVERSING")
BANK_ID = "ICBC"
CALL_DEADLINE_S = 3.0
SHORT_DEADLINE_S = (0.001, 0.03)
SHORT_DEADLINE_CALLS = (3, 15)
BLACKHOLE_S = (0.3, 2.0)
CUT_BYTES = (20, 4_000)
CONCURRENCY = 8
QUIESCE_ROUNDS_MAX = 60
QUIESCE_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
SEED_TIMEOUT_S = 300.0
ACCOUNTS = 400
PAY_FEN = (100, 40_000)
LONG_OPS, LONG_FAULTS = 100_000, 500
# Continuous reconciliation in the soak: a tighter cadence than production's (10 s / 30 s / 5 s) so that a
# short run still spans many exchanges and windows; --control-* flags set production's to measure it.
CONTROL_INTERVAL_S, CONTROL_WINDOW_S, CONTROL_SETTLE_S = 1.0, 10.0, 1.0
CONTROL_SAMPLE_S = 1.0
CONTROL_AGREEING_EXCHANGES = 2
CONTROL_FLAG_TIMEOUT_S = 180.0

bridge_journal = sa.table(  # the bridge's journal, only the columns read here (bank_sim imports nothing of bridge)
    "bridge_journal", sa.column("kind", sa.String), sa.column("serial", sa.String),
    sa.column("bank_id", sa.String), sa.column("state", sa.String), sa.column("amount_fen", sa.BigInteger))


@dataclass(frozen=True)
class Fault:
    at_op: int
    kind: str
    arg: float


def make_schedule(seed: int, ops: int, faults: int, db_faults: bool = False) -> tuple[list[str], list[Fault]]:
    """The operations and the faults of a run: a function of the seed alone."""
    rng = random.Random(seed)
    kinds = FAULT_KINDS + (DB_FAULT_KINDS if db_faults else ())
    names = [n for n, _ in OP_MIX]
    weights = [w for _, w in OP_MIX]
    operations = rng.choices(names, weights, k=ops)
    positions = sorted(rng.sample(range(1, ops), min(faults, ops - 1)))
    out = []
    for i, at in enumerate(positions):
        kind = kinds[i] if i < len(kinds) else rng.choice(kinds)  # every kind at least once
        arg = {"link_blackhole": rng.uniform(*BLACKHOLE_S), "db_blackhole": rng.uniform(*BLACKHOLE_S), "link_cut": float(rng.randint(*CUT_BYTES)),
               "short_deadline": float(rng.randint(*SHORT_DEADLINE_CALLS))}.get(kind, 0.0)
        out.append(Fault(at, kind, arg))
    return operations, out


def schedule_digest(operations: list[str], faults: list[Fault]) -> str:
    h = hashlib.sha256(json.dumps([operations, [(f.at_op, f.kind, round(f.arg, 6)) for f in faults]]).encode())
    return h.hexdigest()[:16]


def free_port() -> int:
    """Outside the ephemeral range: a restart after a kill finds it free (yindian_common.ports)."""
    return stable_port()


@dataclass(frozen=True)
class ControlCadence:
    interval_s: float = CONTROL_INTERVAL_S
    window_s: float = CONTROL_WINDOW_S
    settle_s: float = CONTROL_SETTLE_S


@dataclass
class Stack:
    work: Path
    mis_db: str
    bridge_db: str
    mis_port: int
    bridge_port: int
    proxy: FaultProxy
    mis_serve_db: str = ""             # the URL mis_adapter serves from (through the DB proxy, if any)
    db_proxy: FaultProxy | None = None
    mis: ServerProcess | None = None
    bridge: ServerProcess | None = None
    control: ControlCadence = ControlCadence()

    def start_mis(self) -> None:
        self.mis = start_server("mis_adapter", [
            "mis_adapter", "serve", "--db", self.mis_serve_db or self.mis_db, "--listen", f"127.0.0.1:{self.mis_port}",
            "--metrics-port", "0", "--insecure", "--control-totals-window-s", str(self.control.window_s),
            "--feed-heartbeat-s", "0.3", "--feed-lease-ttl-s", "3"],
            log_dir=self.work, ready_timeout_s=READY_TIMEOUT_S)

    def start_bridge(self) -> None:
        self.bridge = start_server("bridge", [
            "bridge", "serve", "--listen", f"127.0.0.1:{self.bridge_port}", "--upstream", self.proxy.address,
            "--db", self.bridge_db, "--bank-id", BANK_ID, "--metrics-port", "0", "--insecure",
            "--resolver-backoff-initial-s", "0.05", "--resolver-backoff-cap-s", "1.0",
            "--resolver-idle-wait-s", "0.2", "--control-totals-interval-s", str(self.control.interval_s),
            "--control-totals-window-s", str(self.control.window_s),
            "--control-totals-settle-s", str(self.control.settle_s)], log_dir=self.work,
            ready_timeout_s=READY_TIMEOUT_S)

    def metrics_ports(self) -> dict[str, int]:
        return {p.name: p.metrics_port for p in (self.mis, self.bridge) if p is not None and p.metrics_port}

    def kill(self, which: str) -> None:
        proc = self.mis if which == "mis" else self.bridge
        if proc is not None and proc.popen.poll() is None:
            proc.popen.kill()  # SIGKILL: no drain, no flush
            proc.popen.wait(STOP_TIMEOUT_S)
        (self.start_mis if which == "mis" else self.start_bridge)()

    def stop(self) -> None:
        for proc in (self.bridge, self.mis):
            if proc is not None and proc.popen.poll() is None:
                proc.stop(STOP_TIMEOUT_S)
        self.proxy.stop()
        if self.db_proxy is not None:
            self.db_proxy.stop()


@dataclass
class Tally:
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    pay_again: int = 0
    violations: list[str] = field(default_factory=list)


class Bank:
    """The bank core's side: its ledger of pays and cancels, and the calls."""

    def __init__(self, prefix: str, accounts: list[str], target: str, seed: int) -> None:
        self.ledger = RunLedger(prefix, BANK_ID, target)
        self.accounts = accounts
        self.lock = threading.Lock()
        self.channel = grpc.insecure_channel(target)
        self.stub = billing_pb2_grpc.BillingServiceStub(self.channel)
        self.md = [(BANK_ID_METADATA, BANK_ID)]
        self.tally = Tally()
        self.short_left = 0
        self.rng = random.Random(seed + 1)
        self.pay_serials: list[str] = []

    def deadline(self) -> float:
        with self.lock:
            if self.short_left > 0:
                self.short_left -= 1
                return self.rng.uniform(*SHORT_DEADLINE_S)
        return CALL_DEADLINE_S

    def request(self, serial: str) -> pb.PayRequest:
        r = self.ledger.pays[serial]
        return pb.PayRequest(bank_serial=serial, account_no=r.account_no, amount_fen=r.amount_fen, outlet_code="O1",
                             teller_id="T1", channel=pb.Channel.Value(f"CHANNEL_{r.channel}"))

    def send_pay(self, serial: str, deadline_s: float, amount_delta_fen: int = 0) -> None:
        req = self.request(serial)
        req.amount_fen += amount_delta_fen
        rec = self.ledger.pays[serial]
        try:
            self.stub.Pay(req, timeout=deadline_s, metadata=self.md)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            self.tally.codes[f"Pay.{code.name}"] += 1
            if code in IN_DOUBT:
                return
            if amount_delta_fen:
                if code != grpc.StatusCode.ALREADY_EXISTS:
                    self.tally.violations.append(f"{serial}: conflicting retry got {code.name}, not ALREADY_EXISTS")
                return
            info = error_info(exc)
            with self.lock:
                if rec.outcome == ACCEPTED and code == grpc.StatusCode.FAILED_PRECONDITION and rec.cancel != CANCEL_NONE:
                    pass  # a retry of a pay the bank has since cancelled: "reversed", as it should be
                elif rec.outcome == ACCEPTED:
                    self.tally.violations.append(f"{serial}: accepted, then a retry was refused {code.name}")
                elif rec.outcome == PENDING:
                    rec.outcome, rec.code = REFUSED, code.name
                    if info is not None and info.reason == "PAYMENT_NOT_APPLIED":
                        self.tally.pay_again += 1
            return
        self.tally.codes["Pay.OK"] += 1
        with self.lock:
            if amount_delta_fen:
                self.tally.violations.append(f"{serial}: a conflicting retry was accepted")
            elif rec.outcome == REFUSED:
                self.tally.violations.append(f"{serial}: refused ({rec.code}), then a retry was accepted")
            else:
                rec.outcome, rec.code = ACCEPTED, "OK"

    def send_cancel(self, serial: str, deadline_s: float) -> None:
        rec = self.ledger.pays[serial]
        req = pb.CancelRequest(cancel_serial=rec.cancel_serial, original_serial=serial, amount_fen=rec.amount_fen,
                               reason="chaos")
        try:
            resp = self.stub.Cancel(req, timeout=deadline_s, metadata=self.md)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            self.tally.codes[f"Cancel.{code.name}"] += 1
            if code not in IN_DOUBT:
                with self.lock:
                    rec.cancel = CANCEL_NONE if rec.cancel == CANCEL_IN_DOUBT else rec.cancel
                    self.tally.violations.append(f"{serial}: cancel {rec.cancel_serial} refused {code.name}: "
                                                 f"{exc.details()}")  # type: ignore[attr-defined]
            return
        self.tally.codes["Cancel.OK"] += 1
        with self.lock:
            if resp.outcome == pb.CANCEL_OUTCOME_REVERSED:
                rec.cancel = CANCEL_REVERSED
            else:
                self.tally.violations.append(f"{serial}: accepted pay, cancel answered ORIGINAL_NOT_FOUND")
                rec.cancel = CANCEL_NONE

    def run_op(self, i: int, op: str, pick: float, amount_fen: int) -> None:
        self.tally.ops[op] += 1
        deadline_s = self.deadline()
        if op == "query":
            acct = self.accounts[int(pick * len(self.accounts))]
            try:
                self.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), timeout=deadline_s, metadata=self.md)
                self.tally.codes["QueryAccount.OK"] += 1
            except grpc.RpcError as exc:
                self.tally.codes[f"QueryAccount.{exc.code().name}"] += 1  # type: ignore[attr-defined]
            return
        if op == "pay":
            serial = f"{self.ledger.prefix}{i}"
            acct = self.accounts[int(pick * len(self.accounts))]
            with self.lock:
                self.ledger.pays[serial] = PayRecord(acct, amount_fen, "COUNTER")
                self.pay_serials.append(serial)
            for attempt in range(IMMEDIATE_RESENDS + 1):
                self.send_pay(serial, deadline_s if attempt == 0 else CALL_DEADLINE_S)
                if self.ledger.pays[serial].outcome != PENDING:
                    break
                time.sleep(RESEND_PAUSE_S * 2 ** attempt)  # the teller's back-off before resending
            return
        with self.lock:
            if not self.pay_serials:
                return
            serial = self.pay_serials[int(pick * len(self.pay_serials))]
            rec = self.ledger.pays[serial]
            if op == "conflict" and rec.outcome != ACCEPTED:
                return  # a serial the bridge may never have journaled: the "conflict" could be its first request
            if op == "cancel":
                if rec.outcome != ACCEPTED or rec.cancel != CANCEL_NONE:
                    return
                rec.cancel, rec.cancel_serial = CANCEL_IN_DOUBT, f"{self.ledger.prefix}C{i}"
        if op == "retry":
            self.send_pay(serial, deadline_s)
        elif op == "conflict":
            self.send_pay(serial, deadline_s, amount_delta_fen=1)
        else:
            self.send_cancel(serial, deadline_s)


def read_accounts(roster: Path, limit: int) -> list[str]:
    with open(roster, encoding="utf-8") as f:
        return [row["account_no"] for row in csv.DictReader(f)][:limit]


def inject(stack: Stack, bank: Bank, feed: FeedSide, fault: Fault) -> None:
    bank.tally.faults[fault.kind] += 1
    if fault.kind == "kill_bank":
        feed.kill_worker()
    elif fault.kind == "kill_mis":
        stack.kill("mis")
    elif fault.kind == "kill_bridge":
        stack.kill("bridge")
    elif fault.kind == "link_blackhole":
        stack.proxy.blackhole()
        threading.Timer(fault.arg, stack.proxy.heal).start()
    elif fault.kind == "link_reset":
        stack.proxy.reset()
        stack.proxy.heal()
    elif fault.kind == "link_cut":
        stack.proxy.cut_after(int(fault.arg))
    elif fault.kind == "db_reset" and stack.db_proxy is not None:  # every MIS database connection terminated
        stack.db_proxy.reset()
        stack.db_proxy.heal()
    elif fault.kind == "db_blackhole" and stack.db_proxy is not None:
        stack.db_proxy.blackhole()
        threading.Timer(fault.arg, stack.db_proxy.heal).start()
    elif fault.kind == "short_deadline":
        with bank.lock:
            bank.short_left += int(fault.arg)


def quiesce(stack: Stack, bank: Bank) -> None:
    """Heal everything, then resend every pay and cancel still in doubt until definite."""
    stack.proxy.heal()
    if stack.db_proxy is not None:
        stack.db_proxy.heal()
    t_end = time.monotonic() + QUIESCE_TIMEOUT_S
    for round_no in range(QUIESCE_ROUNDS_MAX):
        pending = [s for s, r in bank.ledger.pays.items() if r.outcome == PENDING]
        cancels = [s for s, r in bank.ledger.pays.items() if r.cancel == CANCEL_IN_DOUBT]
        if not pending and not cancels:
            return
        if time.monotonic() > t_end:
            break
        for s in pending:
            bank.send_pay(s, CALL_DEADLINE_S * 2)
        for s in cancels:
            if bank.ledger.pays[s].outcome == ACCEPTED:
                bank.send_cancel(s, CALL_DEADLINE_S * 2)
        time.sleep(min(2.0, 0.1 * (round_no + 1)))  # back-off between rounds of resends


def wait_journal_settled(bridge_db: str, prefix: str) -> int:
    eng = make_engine(bridge_db, pool_size=1)
    j = bridge_journal.c
    stmt = sa.select(sa.func.count()).select_from(bridge_journal).where(
        j.state.in_(UNSETTLED_JOURNAL_STATES), j.serial.like(prefix + "%"))
    try:
        t_end = time.monotonic() + QUIESCE_TIMEOUT_S
        while True:
            with eng.connect() as conn:
                n = int(conn.execute(stmt).scalar_one())
            if n == 0 or time.monotonic() > t_end:
                return n
            time.sleep(0.5)  # polling another process's database: nothing to wait on
    finally:
        eng.dispose()


def reconcile(bank: Bank, day: dt.date, auto_debits: list[pb.BankRecord]) -> tuple[int, pb.ReconcileSummary | None]:
    records = [pb.BankRecord(bank_serial=s, account_no=r.account_no, amount_fen=r.amount_fen,
                             status=pb.BANK_RECORD_STATUS_CANCELLED if r.cancel == CANCEL_REVERSED
                             else pb.BANK_RECORD_STATUS_POSTED)
               for s, r in bank.ledger.pays.items() if r.outcome == ACCEPTED] + auto_debits
    msgs = [pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=day.isoformat()))]
    for k in range(0, len(records), 5_000):
        msgs.append(pb.ReconcileRequest(batch=pb.BankRecordBatch(records=records[k:k + 5_000])))
    msgs.append(pb.ReconcileRequest(trailer=pb.ReconcileTrailer(record_count=len(records),
                                                                total_fen=sum(r.amount_fen for r in records))))
    lines, summary = 0, None
    for resp in bank.stub.Reconcile(iter(msgs), timeout=120, metadata=bank.md):
        if resp.WhichOneof("body") == "discrepancies":
            lines += len(resp.discrepancies.discrepancies)
            for d in resp.discrepancies.discrepancies[:5]:
                bank.tally.violations.append(f"reconcile: {d.bank_serial} {pb.ReconcileOutcome.Name(d.outcome)} "
                                             f"{d.detail}")
        else:
            summary = resp.summary
    return lines, summary


def money_totals(mis_db: str) -> tuple[int, int]:
    """Everything paid into the MIS's books: principal and late fees paid on bills, plus prepaid credit."""
    eng = make_engine(mis_db, pool_size=1)
    b, c = mis_tables.bills.c, mis_tables.customers.c
    try:
        with eng.connect() as conn:
            paid = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(b.principal_paid_fen + b.late_fee_paid_fen),
                                                           0))).scalar_one()
            prepaid = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(c.prepaid_fen), 0))).scalar_one()
            bills = conn.execute(sa.select(sa.func.count()).select_from(mis_tables.bills)).scalar_one()
        return int(paid) + int(prepaid), int(bills)
    finally:
        eng.dispose()


def check_journal(bridge_db: str, bank: Bank) -> list[str]:
    """The bridge's journal against the bank's ledger: accepted pays POSTED, refused ones not."""
    eng = make_engine(bridge_db, pool_size=1)
    j = bridge_journal.c
    out = []
    try:
        with eng.connect() as conn:
            rows = {r.serial: r for r in conn.execute(
                sa.select(j.serial, j.state, j.amount_fen).where(j.kind == "PAY",
                                                                 j.serial.like(bank.ledger.prefix + "%")))}
            unsettled = conn.execute(sa.select(sa.func.count()).select_from(bridge_journal).where(
                j.state.in_(UNSETTLED_JOURNAL_STATES))).scalar_one()
    finally:
        eng.dispose()
    if unsettled:
        out.append(f"journal: {unsettled} rows still in doubt")
    for serial, rec in bank.ledger.pays.items():
        row = rows.get(serial)
        if rec.outcome == ACCEPTED and (row is None or row.state != "POSTED"):
            out.append(f"journal: {serial} accepted, journal {row.state if row else 'missing'}")
        if rec.outcome == REFUSED and row is not None and row.state == "POSTED":
            out.append(f"journal: {serial} refused at the bank, journal POSTED")
    return out


def tamper_one_payment(mis_db: str, bank: Bank) -> str:
    """Change one accepted payment's amount in the MIS behind the system's back: the checks must catch it."""
    serial = next(s for s, r in bank.ledger.pays.items() if r.outcome == ACCEPTED and r.cancel == CANCEL_NONE)
    eng = make_engine(mis_db, pool_size=1)
    p = mis_tables.payments.c
    try:
        with eng.begin() as conn:
            conn.execute(sa.update(mis_tables.payments).where(p.bank_id == BANK_ID, p.bank_serial == serial)
                         .values(amount_fen=p.amount_fen + 1))
    finally:
        eng.dispose()
    print(f"tampered: payments.amount_fen of {serial} raised by 1 fen behind the system's back", flush=True)
    return serial


def log_lines(work: Path, name: str, event: str) -> list[str]:
    path = work / f"{name}.log"
    if not path.exists():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip() for line in f if f"event={event}" in line]


@dataclass
class ControlReport:
    samples: int
    missed: int
    max_fen: float
    nonzero: list[str]
    agreed_after: bool
    flagged_before_tamper: list[str]
    flag_s: dict[str, float | None] = field(default_factory=dict)
    named: bool = False

    @property
    def ok(self) -> bool:
        return self.max_fen == 0 and self.agreed_after and not self.flagged_before_tamper


def control_after_quiescence(stack: Stack, watch: ControlWatch) -> ControlReport:
    """Stops the sampling once exchanges agree again after quiescence (bounded)."""
    agreed = watch.wait_agreeing(CONTROL_AGREEING_EXCHANGES,
                                 stack.control.interval_s * (CONTROL_AGREEING_EXCHANGES + 2) + 30.0)
    watch.stop()
    flagged = log_lines(stack.work, "bridge", "control_totals_diverged") + \
        log_lines(stack.work, "mis_adapter", "control_totals_diverged")
    return ControlReport(watch.samples, watch.missed, watch.max_fen, list(watch.nonzero), agreed, flagged)


def measure_flag(stack: Stack, watch: ControlWatch, report: ControlReport, mis_db: str, bank: Bank) -> None:
    """Tampers one MIS row and measures the seconds until each server's gauge is non-zero."""
    t0 = time.monotonic()
    serial = tamper_one_payment(mis_db, bank)
    report.flag_s = watch.seconds_to_flag(t0, CONTROL_FLAG_TIMEOUT_S)
    t_end = time.monotonic() + 10 * stack.control.interval_s + 10.0
    while time.monotonic() < t_end and not report.named:
        report.named = any(serial in line for line in log_lines(stack.work, "bridge",
                                                                "control_totals_differing_serials"))
        time.sleep(0.2)  # polling the bridge's log file: nothing to wait on


def server_database(admin_url: str, name: str, proxy_address: str) -> tuple[str, str]:
    """A fresh MIS database on a server: (direct URL, URL through the DB fault proxy)."""
    direct = create_database(admin_url, name)
    host, port = proxy_address.rsplit(":", 1)
    return direct, sa.make_url(direct).set(host=host, port=int(port)).render_as_string(hide_password=False)


def run(seed: int, ops: int, faults: int, work: Path, tamper: bool = False, db_server: str = "",
        control: ControlCadence = ControlCadence()) -> int:
    operations, schedule = make_schedule(seed, ops, faults, db_faults=bool(db_server))
    print(f"chaos seed={seed} ops={ops} faults={len(schedule)} schedule={schedule_digest(operations, schedule)} "
          f"work={work}", flush=True)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    mis_db, bridge_db = f"sqlite:///{work / 'mis.db'}", f"sqlite:///{work / 'bridge.db'}"
    # a name of its own per run: two runs of one seed on one server (two CI checkouts) must not drop each
    # other's database (create_database drops any database of the name first)
    db_proxy, mis_serve_db, db_name = None, "", f"yd_chaos_{seed}_{uuid.uuid4().hex[:8]}"
    if db_server:
        u = sa.make_url(normalize_url(db_server))
        db_proxy = FaultProxy(f"{u.host}:{u.port or 5432}").start()
        mis_db, mis_serve_db = server_database(db_server, db_name, db_proxy.address)
    started_on = business_date(make_clock(None))  # the seed's day (or the day before, across midnight)
    run_command("seed", ["mis_adapter", "seed", "--db", mis_db, "--accounts", str(ACCOUNTS), "--roster-dir",
                         str(work / "rosters"), "--random-seed", str(seed)], log_dir=work, timeout_s=SEED_TIMEOUT_S)
    accounts = read_accounts(work / "rosters" / f"{BANK_ID}.csv", ACCOUNTS)
    mis_port, bridge_port = free_port(), free_port()
    proxy = FaultProxy(f"127.0.0.1:{mis_port}").start()
    stack = Stack(work, mis_db, bridge_db, mis_port, bridge_port, proxy, mis_serve_db, db_proxy, control=control)
    watch = ControlWatch(stack.metrics_ports, BANK_ID, CONTROL_SAMPLE_S)
    feed = FeedSide(work, mis_db, BANK_ID, f"127.0.0.1:{bridge_port}", feed_period(started_on))
    tranche_at = {ops * (k + 1) // (FEED_TRANCHES + 1): k for k in range(FEED_TRANCHES)}
    prefix = f"K{seed % 10_000_000}-"
    t0 = time.monotonic()
    try:
        stack.start_mis()
        stack.start_bridge()
        watch.start()
        feed.start_worker()
        totals_before, bills_before = money_totals(mis_db)
        bank = Bank(prefix, accounts, f"127.0.0.1:{bridge_port}", seed)
        op_rng = random.Random(seed + 2)
        picks = [(op_rng.random(), op_rng.randint(*PAY_FEN)) for _ in range(ops)]
        fault_at = {f.at_op: f for f in schedule}
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            window: list[Any] = []
            for i, op in enumerate(operations):
                if i in fault_at:
                    for fut in window:  # the fault lands after the operations before it were answered
                        fut.result()
                    window.clear()
                    inject(stack, bank, feed, fault_at[i])
                if i in tranche_at:
                    window.append(pool.submit(feed.issue_tranche, tranche_at[i]))
                window.append(pool.submit(bank.run_op, i, op, *picks[i]))
                if len(window) >= CONCURRENCY * 4:
                    window.pop(0).result()
            for fut in window:
                fut.result()
        drive_s = time.monotonic() - t0
        quiesce(stack, bank)
        unsettled = wait_journal_settled(bridge_db, prefix)
        feed_acked = feed.wait_acknowledged()
        control_report = control_after_quiescence(stack, watch)
        if tamper:
            measure_flag(stack, watch, control_report, mis_db, bank)
        day = business_date(make_clock(None))
        lines, summary = reconcile(bank, day, feed.bank_records())
        mis_view = read_mis([mis_db], BANK_ID, prefix)
        mis_check = compare(bank.ledger, mis_view, "MIS", mis_complete=True)
        journal_problems = check_journal(bridge_db, bank)
        totals_after, bills_after = money_totals(mis_db)
        feed_check = feed.check()
    finally:
        feed.stop_worker()
        watch.stop()
        stack.stop()
        if db_server:
            drop_database(db_server, db_name)
    net_fen = mis_check.accepted_fen - mis_check.cancelled_fen + feed_check.paid_fen
    money_delta = totals_after - totals_before
    report(bank, mis_check, lines, unsettled, journal_problems, net_fen, money_delta, bills_before, bills_after,
           drive_s, summary)
    feed_ok = (feed_acked and not feed_check.problems and feed_check.bills == feed.issued
               and feed_check.fed == feed.issued and bills_after == bills_before + feed.issued)
    report_feed(feed, feed_check, feed_acked)
    report_control(control_report, stack.control)
    ok = (mis_check.ok and lines == 0 and unsettled == 0 and not journal_problems and not bank.tally.violations
          and money_delta == net_fen and feed_ok and control_report.ok)
    print(f"chaos seed={seed}: {'OK: every invariant holds' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def report(bank: Bank, mis_check: Any, recon_lines: int, unsettled: int, journal_problems: list[str],
           net_fen: int, money_delta: int, bills_before: int, bills_after: int, drive_s: float,
           summary: pb.ReconcileSummary | None) -> None:
    t = bank.tally
    pays = sum(1 for _ in bank.ledger.pays)
    accepted = sum(1 for r in bank.ledger.pays.values() if r.outcome == ACCEPTED)
    refused = sum(1 for r in bank.ledger.pays.values() if r.outcome == REFUSED)
    in_doubt = sum(1 for r in bank.ledger.pays.values() if r.outcome == PENDING)
    print(f"operations: {sum(t.ops.values())} in {drive_s:.1f} s  " + " ".join(f"{k}={v}" for k, v in
                                                                             sorted(t.ops.items())))
    print(f"faults: {sum(t.faults.values())}  " + " ".join(f"{k}={v}" for k, v in sorted(t.faults.items())))
    print(f"pays: {pays} accepted={accepted} refused={refused} still_in_doubt={in_doubt} "
          f"pay_again={t.pay_again} ({100.0 * t.pay_again / max(1, pays):.2f} % of pays)")
    print("answers: " + " ".join(f"{k}={v}" for k, v in sorted(t.codes.items())))
    print(f"reconciliation: {recon_lines} discrepancies; net settlement "
          f"{summary.net_settlement_fen if summary else '-'} fen; bank ledger net {net_fen} fen")
    print(f"MIS check: {mis_check.discrepancy_count} discrepancies (accepted {mis_check.accepted}, cancelled "
          f"{mis_check.cancelled}, posted in MIS {mis_check.mis_posted} = {mis_check.mis_posted_fen} fen)")
    for d in mis_check.discrepancies[:10]:
        print(f"  {d.bank_serial} {d.kind} {d.detail}")
    print(f"money into the MIS's books: {money_delta} fen (bank ledger net {net_fen}); bills {bills_before} -> "
          f"{bills_after}")
    print(f"bridge journal: {unsettled} unsettled, {len(journal_problems)} disagreements")
    for p in journal_problems[:10]:
        print(f"  {p}")
    print(f"violations seen by the bank core: {len(t.violations)}")
    for v in t.violations[:10]:
        print(f"  {v}")


def report_feed(feed: FeedSide, c: Any, acked: bool) -> None:
    print(f"bill feed: {feed.issued} bills issued in tranches, {c.fed} fed, all acknowledged: "
          f"{'yes' if acked else 'NO'}; debited {c.paid_by_debit} = {c.paid_fen} fen (bank ledger {c.bank_debits} "
          f"= {c.bank_debit_fen} fen), insufficient funds {c.dunning} (bank {c.bank_insufficient}); "
          f"auto-debit worker killed {feed.kills}; {len(c.problems)} problems")
    for p in c.problems[:10]:
        print(f"  {p}")


def _seconds(value: float | None) -> str:
    return "NOT FLAGGED" if value is None else f"{value:.1f} s"


def report_control(r: ControlReport, c: ControlCadence) -> None:
    print(f"control totals (every {c.interval_s:g} s, window {c.window_s:g} s, settle {c.settle_s:g} s): "
          f"{r.samples} samples of both servers' gauges during the run ({r.missed} missed while restarting), "
          f"max divergence {r.max_fen:.0f} fen; agreeing after quiescence: {'yes' if r.agreed_after else 'NO'}; "
          f"flagged before any tamper: {len(r.flagged_before_tamper)}")
    for line in r.nonzero + r.flagged_before_tamper[:5]:
        print(f"  {line}")
    if r.flag_s:
        times = " ".join(f"{side}={_seconds(v)}" for side, v in sorted(r.flag_s.items()))
        print(f"control totals: injected discrepancy flagged in {times}; bridge log names the serial: "
              f"{'yes' if r.named else 'NO'}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="schedule seed (default: random, printed)")
    parser.add_argument("--ops", type=int, default=10_000, help="operations to drive")
    parser.add_argument("--faults", type=int, default=60, help="faults to inject")
    parser.add_argument("--long", action="store_true", help=f"the long soak: {LONG_OPS} ops, {LONG_FAULTS} faults")
    parser.add_argument("--work-dir", default="var/chaos", help="emptied first; databases and process logs")
    parser.add_argument("--tamper", action="store_true",
                        help="change one MIS payment behind the system's back before the checks (they must fail)")
    parser.add_argument("--mis-db-server", default="",
                        help="admin URL of a PostgreSQL server: the MIS lives there (a fresh database, dropped "
                             "after) behind a fault proxy, adding db_reset and db_blackhole faults")
    parser.add_argument("--control-interval-s", type=float, default=CONTROL_INTERVAL_S,
                        help="seconds between exchanges of control totals (production default 10)")
    parser.add_argument("--control-window-s", type=float, default=CONTROL_WINDOW_S,
                        help="how long a divergence must persist before it is flagged (production default 30)")
    parser.add_argument("--control-settle-s", type=float, default=CONTROL_SETTLE_S,
                        help="clock-skew allowance of the control totals' cutoff (production default 5)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    ops, faults = (LONG_OPS, LONG_FAULTS) if args.long else (args.ops, args.faults)
    if ops < 2 or faults < 0:
        parser.error("--ops must be ≥ 2 and --faults ≥ 0")
    return run(seed, ops, faults, Path(args.work_dir), tamper=args.tamper, db_server=args.mis_db_server,
               control=ControlCadence(args.control_interval_s, args.control_window_s, args.control_settle_s))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
