"""Continuous reconciliation end to end: real mis_adapter and bridge processes
(seeded SQLite MIS) exchanging control totals every half second with a
two-second persistence window.

- After a run of pays and cancels through the bridge both servers show
  `yindian_control_total_divergence_fen{bank="ICBC"}` at 0 while exchanges
  keep agreeing, and the utility's totals for the day are the bank's own
  (asked directly over ExchangeControlTotals).
- A payment's amount changed by SQL in the MIS behind the system's back makes
  the gauge show the difference on both servers within the bound, and both
  logs name the serial; putting the row back brings the gauges to 0."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.support.databases import migrated_sqlite
from tests.support.procs import REPO, Proc, start
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.ports import stable_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

BANK = "ICBC"
ACCOUNTS = 40
PAYS, CANCELS = 16, 5
CALL_TIMEOUT_S = 10.0
INTERVAL_S, WINDOW_S, SETTLE_S = 0.5, 2.0, 0.2
# The bound a divergence must be flagged within here: settle + window + two intervals, with room for a loaded box.
FLAG_BOUND_S = 30.0
AGREEING_EXCHANGES = 3
DIVERGENCE = "yindian_control_total_divergence_fen"
EXCHANGES = "yindian_control_total_exchanges"


def free_port() -> int:
    """Outside the ephemeral range: a restart after a kill finds it free (yindian_common.ports)."""
    return stable_port()


@dataclass
class Stack:
    mis_db: str
    mis: Proc
    bridge: Proc
    accounts: list[str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("control")
    mis_db = migrated_sqlite(work / "mis.db")
    subprocess.run([sys.executable, "-m", "mis_adapter", "seed", "--db", mis_db, "--accounts", str(ACCOUNTS),
                    "--roster-dir", str(work / "rosters")], cwd=REPO, check=True, timeout=180, capture_output=True)
    eng = make_engine(mis_db, pool_size=1)
    with eng.connect() as conn:
        accounts = [r[0] for r in conn.execute(sa.text(
            "SELECT account_no FROM customers WHERE status = 'OPEN' ORDER BY account_no"))]
    eng.dispose()
    mis_port = free_port()
    mis = start("mis_adapter", ["mis_adapter", "serve", "--db", mis_db, "--listen", f"127.0.0.1:{mis_port}",
                                "--metrics-port", "0", "--insecure", "--no-migrate",
                                "--control-totals-window-s", str(WINDOW_S)], log_dir=work)
    bridge = start("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{mis_port}",
                              "--db", f"sqlite:///{work / 'bridge.db'}", "--bank-id", BANK, "--metrics-port", "0",
                              "--insecure", "--control-totals-interval-s", str(INTERVAL_S),
                              "--control-totals-window-s", str(WINDOW_S),
                              "--control-totals-settle-s", str(SETTLE_S)], log_dir=work)
    yield Stack(mis_db, mis, bridge, accounts)
    for p in (bridge, mis):
        p.terminate()


def metric(proc: Proc, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def exchanges(proc: Proc, result: str) -> float:
    return metric(proc, f"{EXCHANGES}_total", bank=BANK, result=result) or 0.0


def wait_for(what: str, check: object, timeout_s: float) -> float:
    """Polls `check()` until true; returns the seconds it took."""
    t0 = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)  # polling another process's /metrics: nothing to wait on
    return time.monotonic() - t0


def set_amount(mis_db: str, serial: str, amount_fen: int) -> None:
    eng = make_engine(mis_db, pool_size=1)
    try:
        with eng.begin() as conn:
            n = conn.execute(sa.text("UPDATE payments SET amount_fen = :a WHERE bank_id = :b AND bank_serial = :s"),
                             {"a": amount_fen, "b": BANK, "s": serial}).rowcount
        assert n == 1
    finally:
        eng.dispose()


def utility_totals(stack: Stack) -> pb.ControlTotals:
    """The MIS's totals of today as the utility answers them (posted at any time up to now)."""
    with grpc.insecure_channel(stack.mis.grpc_addr) as ch:
        req = pb.ExchangeControlTotalsRequest(settlement_date=today(), totals=pb.ControlTotals())
        req.posted_before.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
        return billing_pb2_grpc.BillingServiceStub(ch).ExchangeControlTotals(
            req, timeout=CALL_TIMEOUT_S, metadata=[(BANK_ID_METADATA, BANK)]).totals


def today() -> str:
    return dt.datetime.now(dt.timezone(dt.timedelta(hours=8))).date().isoformat()


def test_control_totals_agree_then_flag_a_row_changed_behind_the_systems_back(stack: Stack) -> None:
    with grpc.insecure_channel(stack.bridge.grpc_addr) as ch:
        bank = billing_pb2_grpc.BillingServiceStub(ch)
        run = uuid.uuid4().hex[:8]
        pays = {}
        for i in range(PAYS):
            serial, amount = f"CT{run}P{i}", 1_000 + 37 * i
            bank.Pay(pb.PayRequest(bank_serial=serial, account_no=stack.accounts[i % len(stack.accounts)],
                                   amount_fen=amount, outlet_code="O1", teller_id="T1", channel=pb.CHANNEL_COUNTER),
                     timeout=CALL_TIMEOUT_S)
            pays[serial] = amount
        cancelled = list(pays)[:CANCELS]
        for i, serial in enumerate(cancelled):
            resp = bank.Cancel(pb.CancelRequest(cancel_serial=f"CT{run}C{i}", original_serial=serial,
                                                amount_fen=pays[serial], reason="test"), timeout=CALL_TIMEOUT_S)
            assert resp.outcome == pb.CANCEL_OUTCOME_REVERSED

    # The utility's totals of the day are the bank's: 11 standing, 5 reversed.
    standing = [s for s in pays if s not in cancelled]
    assert utility_totals(stack) == pb.ControlTotals(
        posted_count=len(standing), posted_fen=sum(pays[s] for s in standing),
        reversed_count=CANCELS, reversed_fen=sum(pays[s] for s in cancelled))

    # Both sides keep agreeing after the run: the gauge is 0 on both servers.
    base = {p.name: exchanges(p, "AGREE") for p in (stack.mis, stack.bridge)}
    wait_for("exchanges agree after the pays", lambda: all(
        exchanges(p, "AGREE") >= base[p.name] + AGREEING_EXCHANGES for p in (stack.mis, stack.bridge)), FLAG_BOUND_S)
    for p in (stack.mis, stack.bridge):
        assert metric(p, DIVERGENCE, bank=BANK) == 0.0, p.name
        assert exchanges(p, "FLAGGED") == 0.0, p.name

    # Behind the system's back: one standing payment's amount raised by 250 fen in the MIS.
    victim = standing[3]
    set_amount(stack.mis_db, victim, pays[victim] + 250)
    took_s = wait_for("the divergence flagged on both servers", lambda: all(
        metric(p, DIVERGENCE, bank=BANK) == 250.0 for p in (stack.mis, stack.bridge)), FLAG_BOUND_S)
    assert took_s >= WINDOW_S - INTERVAL_S  # not on a single exchange: only once it persisted
    wait_for("both logs name the serial", lambda: any(
        "event=control_totals_differing_serials" in line and victim in line for line in stack.bridge.output) and any(
        "event=control_totals_differing_serials" in line and victim in line for line in stack.mis.output), 10.0)
    assert any("event=control_totals_diverged" in line and "divergence_fen=250" in line
               for line in stack.mis.output)
    flagged_lines = [line for line in stack.bridge.output if "event=control_totals_diverged" in line]
    assert len(flagged_lines) == 1  # logged once, however many exchanges still diverge

    # Put back: agreement again, gauges at 0.
    set_amount(stack.mis_db, victim, pays[victim])
    wait_for("the gauges back at 0", lambda: all(
        metric(p, DIVERGENCE, bank=BANK) == 0.0 for p in (stack.mis, stack.bridge)), FLAG_BOUND_S)
