"""Metrics end to end, with real processes on loopback: mis_adapter (seeded
SQLite) and a bridge, driven by a small paced client loop through the bridge.

- /metrics of every process passes `promtool check metrics`.
- A known sequence of calls (3 pays, 1 NOT_FOUND query) moves the gRPC and
  business counters of both processes by exactly that sequence, nothing else.
- Debian's Prometheus, started on a free loopback port with its own config and
  data directory, scrapes the stack; every expression of every dashboard panel
  is evaluated through its HTTP API and must parse and return data.

With CI=true a missing prometheus/promtool binary fails; elsewhere it skips."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dashboards.lint import DASHBOARDS_DIR, dashboard_expressions
from tests.support import procs
from tests.support.databases import migrated_sqlite
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.fields import make_account_no
from yindian_common.ports import stable_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CLOCK_START = "2026-11-28T10:00:00+08:00"
SEED_ACCOUNTS = 300
CALL_TIMEOUT_S = 10.0
# The background load: a few calls every LOAD_PAUSE_S, for at most LOAD_MAX_S or LOAD_ITERATIONS_MAX rounds.
LOAD_PAUSE_S = 0.05
LOAD_MAX_S = 240.0
LOAD_ITERATIONS_MAX = 20_000
SCRAPE_INTERVAL = "1s"
# What the test substitutes for Grafana's variables: rates over a few scrapes, increases over the test's life.
SUBSTITUTIONS = {"$__rate_interval": "15s", "${__rate_interval}": "15s", "$__range": "5m",
                 "$job": ".+", "$instance": ".+"}
PROMETHEUS_READY_S = 60.0
ALL_DATA_S = 90.0
UNKNOWN_ACCOUNT = make_account_no("01", 9_999_999)


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed and CI=true requires it (apt-get install prometheus)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


# ---- the stack and its load ------------------------------------------------------------------------------------


class Load:
    """Queries, NOT_FOUND queries, pays and cancels through the bridge, paced, until stopped or bounded out.
    `paused()` holds it between calls so a test can make an exact sequence of its own."""

    def __init__(self, stub: billing_pb2_grpc.BillingServiceStub, accounts: list[str]) -> None:
        self._stub, self._accounts = stub, accounts
        self._stop = threading.Event()
        self._gate = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.rounds = 0
        self.errors: list[str] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(CALL_TIMEOUT_S * 4)

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self._gate:
            yield

    def _run(self) -> None:
        deadline = time.monotonic() + LOAD_MAX_S
        tag = uuid.uuid4().hex[:8]
        while not self._stop.is_set() and time.monotonic() < deadline and self.rounds < LOAD_ITERATIONS_MAX:
            with self._gate:
                try:
                    self._round(f"L{tag}{self.rounds:07d}")
                except grpc.RpcError as exc:
                    if len(self.errors) < 100:
                        self.errors.append(f"{exc.code()}: {exc.details()}")
            self.rounds += 1
            self._stop.wait(LOAD_PAUSE_S)

    def _round(self, serial: str) -> None:
        account = self._accounts[self.rounds % len(self._accounts)]
        s = self._stub
        s.QueryAccount(pb.QueryAccountRequest(account_no=account), timeout=CALL_TIMEOUT_S)
        try:
            s.QueryAccount(pb.QueryAccountRequest(account_no=UNKNOWN_ACCOUNT), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        s.Pay(pb.PayRequest(bank_serial=serial, account_no=account, amount_fen=100 + self.rounds % 50,
                            outlet_code="OUT01", teller_id="T01", channel=pb.CHANNEL_COUNTER), timeout=CALL_TIMEOUT_S)
        if self.rounds % 3 == 0:
            s.Cancel(pb.CancelRequest(cancel_serial="C" + serial, original_serial=serial,
                                      amount_fen=100 + self.rounds % 50, reason="load test"), timeout=CALL_TIMEOUT_S)
        s.GetPayment(pb.GetPaymentRequest(bank_serial=serial), timeout=CALL_TIMEOUT_S)


@dataclass
class Stack:
    mis: procs.Proc
    bridge: procs.Proc
    stub: billing_pb2_grpc.BillingServiceStub
    accounts: list[str]
    load: Load
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics_ports(self) -> dict[str, int]:
        return {"mis_adapter": self.mis.metrics_port, "bridge": self.bridge.metrics_port}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("prom-stack")
    db = migrated_sqlite(work / "mis.db")
    seeded = subprocess.run([procs.sys.executable, "-m", "mis_adapter", "seed", "--db", db, "--accounts",
                             str(SEED_ACCOUNTS), "--roster-dir", str(work / "rosters"), "--clock-start", CLOCK_START],
                            cwd=procs.REPO, capture_output=True, text=True, timeout=120)
    assert seeded.returncode == 0, seeded.stdout[-3000:] + seeded.stderr[-3000:]
    accounts = (work / "rosters" / "ICBC.csv").read_text(encoding="utf-8").split()[1:]
    assert accounts, "the ICBC roster is empty"
    mis = procs.start("mis_adapter", ["mis_adapter", "serve", "--db", db, "--listen", "127.0.0.1:0",
                                      "--metrics-port", "0", "--insecure", "--clock-start", CLOCK_START],
                      log_dir=work)
    bridge = None
    channel = None
    try:
        bridge = procs.start("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", mis.grpc_addr,
                                        "--db", f"sqlite:///{work / 'bridge.db'}", "--bank-id", "ICBC",
                                        "--metrics-port", "0", "--insecure", "--clock-start", CLOCK_START],
                             log_dir=work)
        channel = grpc.insecure_channel(bridge.grpc_addr)
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        load = Load(stub, accounts[:50])
        load.start()
        yield Stack(mis, bridge, stub, accounts, load)
        load.stop()
    finally:
        if channel is not None:
            channel.close()
        for p in (bridge, mis):
            if p is not None:
                p.terminate()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=CALL_TIMEOUT_S) as resp:
        return resp.read().decode("utf-8")


# The bridge's resolver may call GetPayment/Cancel on its own if a load pay went in doubt: not ours to count.
SEQUENCE_METHODS = {"Pay", "QueryAccount"}


def samples(port: int, *names: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(scrape(port)):
        for s in fam.samples:
            if s.name in names and s.labels.get("grpc_method", "Pay") in SEQUENCE_METHODS:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def moved(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


# ---- tests -----------------------------------------------------------------------------------------------------


def test_every_process_metrics_pass_promtool(stack: Stack) -> None:
    promtool = _binary("promtool")
    for name, port in stack.metrics_ports().items():
        text = scrape(port)
        assert "grpc_server_handled_total" in text, name
        out = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
        assert out.returncode == 0, f"{name}: {out.stdout.decode()}{out.stderr.decode()}"


GRPC_COUNTERS = ("grpc_server_started_total", "grpc_server_handled_total", "grpc_server_handling_seconds_count",
                 "grpc_client_started_total", "grpc_client_handled_total")
BUSINESS_COUNTERS = ("yindian_payments_total", "yindian_payments_fen_total", "yindian_cancels_total")


def test_counters_move_by_exactly_the_calls_made(stack: Stack) -> None:
    svc = {"grpc_service": "yindian.v1.BillingService", "grpc_type": "unary"}
    pay, query = {**svc, "grpc_method": "Pay"}, {**svc, "grpc_method": "QueryAccount"}
    account = stack.accounts[-1]  # not one the load pays
    with stack.load.paused():
        before_b = samples(stack.bridge.metrics_port, *GRPC_COUNTERS, *BUSINESS_COUNTERS)
        before_m = samples(stack.mis.metrics_port, *GRPC_COUNTERS, *BUSINESS_COUNTERS)
        tag = uuid.uuid4().hex[:10]
        for i, amount_fen in enumerate((100, 250, 1_000)):
            stack.stub.Pay(pb.PayRequest(bank_serial=f"X{tag}{i}", account_no=account, amount_fen=amount_fen,
                                         outlet_code="OUT02", teller_id="T02", channel=pb.CHANNEL_ATM),
                           timeout=CALL_TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as err:
            stack.stub.QueryAccount(pb.QueryAccountRequest(account_no=UNKNOWN_ACCOUNT), timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        after_b = samples(stack.bridge.metrics_port, *GRPC_COUNTERS, *BUSINESS_COUNTERS)
        after_m = samples(stack.mis.metrics_port, *GRPC_COUNTERS, *BUSINESS_COUNTERS)

    # The bridge served 3 pays and 1 failed query, and made the same calls upstream.
    assert moved(before_b, after_b) == {
        key("grpc_server_started_total", **pay): 3, key("grpc_server_handled_total", **pay, grpc_code="OK"): 3,
        key("grpc_server_handling_seconds_count", **pay): 3,
        key("grpc_server_started_total", **query): 1,
        key("grpc_server_handled_total", **query, grpc_code="NOT_FOUND"): 1,
        key("grpc_server_handling_seconds_count", **query): 1,
        key("grpc_client_started_total", **pay): 3, key("grpc_client_handled_total", **pay, grpc_code="OK"): 3,
        key("grpc_client_started_total", **query): 1,
        key("grpc_client_handled_total", **query, grpc_code="NOT_FOUND"): 1,
    }
    # The utility served them and counted 3 ATM payments of ICBC, 1,350 fen.
    assert moved(before_m, after_m) == {
        key("grpc_server_started_total", **pay): 3, key("grpc_server_handled_total", **pay, grpc_code="OK"): 3,
        key("grpc_server_handling_seconds_count", **pay): 3,
        key("grpc_server_started_total", **query): 1,
        key("grpc_server_handled_total", **query, grpc_code="NOT_FOUND"): 1,
        key("grpc_server_handling_seconds_count", **query): 1,
        key("yindian_payments_total", bank="ICBC", channel="ATM"): 3,
        key("yindian_payments_fen_total", bank="ICBC", channel="ATM"): 1_350,
    }


# ---- the real Prometheus ---------------------------------------------------------------------------------------


def _free_port() -> int:
    """Outside the ephemeral range: a restart after a kill finds it free (yindian_common.ports)."""
    return stable_port()


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_S) as resp:
        return json.loads(resp.read().decode("utf-8"))


def _wait(cond: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]

    def query(self, expr: str) -> dict[str, Any]:
        q = urllib.parse.urlencode({"query": expr})
        try:
            return dict(_get_json(f"{self.url}/api/v1/query?{q}"))
        except urllib.error.HTTPError as exc:  # 400 with the parse error in the body
            return dict(json.loads(exc.read().decode("utf-8")))


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = _binary("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
                   for job, port in stack.metrics_ports().items())
    config = work / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n"
                      f"  evaluation_interval: {SCRAPE_INTERVAL}\nscrape_configs:\n{jobs}", encoding="utf-8")
    port = _free_port()
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _ready(url), PROMETHEUS_READY_S, "prometheus to be ready", proc)
        yield Prometheus(url, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def substitute(expr: str) -> str:
    for var, value in SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    return expr


def test_every_dashboard_expression_returns_data(stack: Stack, prometheus: Prometheus) -> None:
    exprs = dashboard_expressions(DASHBOARDS_DIR)
    assert len(exprs) >= 25, "the dashboards lost their panels"
    # Every scrape target up first: a missing target would make every expression look empty.
    _wait(lambda: len([r for r in prometheus.query("up == 1")["data"]["result"]]) == 2, 60,
          "both targets to be scraped", prometheus.proc)
    pending = {where: substitute(expr) for where, expr in exprs}
    results: dict[str, dict[str, Any]] = {}

    def all_returned_data() -> bool:
        for where, expr in list(pending.items()):
            answer = prometheus.query(expr)
            results[where] = answer
            if answer.get("status") != "success":
                raise AssertionError(f"{where}: Prometheus refused {expr!r}: {answer.get('error')}")
            if answer["data"]["result"]:
                del pending[where]
        return not pending

    try:
        _wait(all_returned_data, ALL_DATA_S, "every panel expression to return data", prometheus.proc)
    except AssertionError as exc:
        empty = "\n".join(f"  {w}: {e}" for w, e in pending.items())
        raise AssertionError(f"{exc}; still empty:\n{empty}\nload rounds={stack.load.rounds} "
                             f"errors={stack.load.errors[:5]}") from None
    assert stack.load.rounds > 0 and not stack.load.errors, stack.load.errors[:5]
