"""`python -m bank_sim load`: an open-loop load generator for BillingService,
with a correctness check of the money at the end.

Open loop: arrival i is due at start + i/rate whatever happened to earlier
calls, and its latency runs from that intended instant, so queueing delay in
the servers or in this generator is measured, not hidden (no coordinated
omission). An arrival that finds all `concurrency` slots busy is dropped and
counted, never delayed. Warm-up arrivals run but are not measured. The run
ends by itself: arrivals stop after warm-up + duration, in-flight calls get at
most `drain_s`, and every call has a deadline.

Operations: `query` (QueryAccount), `pay` (a COUNTER Pay), `autodebit` (a Pay
on the AUTO_DEBIT channel, as the bank's auto-debit consumer posts it; the
feed stream itself is not driven) and `cancel` (a Cancel of an earlier
accepted pay of the same run; a query when there is none yet). Pays carry
fresh serials unique to the run (one prefix), and an in-doubt answer is
retried with the same serial. At the end every pay or cancel still in doubt is resent with its
serial, then the run's ledger is checked against the MIS database(s)
(`--mis-db`, read only) or, without one, against GetPayment through the
target: every accepted pay present exactly once, POSTED (REVERSED if the run
cancelled it), no refused pay POSTED, and accepted fen minus cancelled fen
equal to the MIS's POSTED fen for the run's serials.

One grpc.aio channel on one event loop: measured on this box against a
trivial server, open loop, the aio client cost 1,260 / 695 / 438 CPU µs per
call at 100 / 500 / 1,500 calls/s against 1,770 / 821 / 430 for sync stubs
with futures, and needs no thread per call (the generator shares the box
with the servers). It never targets a host that is neither loopback nor
named by `--allow-host`.

Library use (bench, bench-core): `run_load(profile)` or `await
run_load_async(profile)` return a `LoadResult`; `check_ledger` re-checks a
saved ledger."""
from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import itertools
import json
import os
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import sqlalchemy as sa
from pydantic import Field, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bank_sim.histogram import LatencyHistogram, LatencySummary
from bank_sim.ledger import read_roster
from bank_sim.settings import LinkSettings
from yindian.v1 import billing_pb2, billing_pb2_grpc
from yindian_common.clock import make_clock
from yindian_common.db import make_engine
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.server import channel_options, check_plaintext_allowed, is_loopback
from yindian_common.settings import add_settings_flags, load_settings

__all__ = ["CheckResult", "Discrepancy", "LoadProfile", "LoadResult", "RunLedger", "check_ledger", "main",
           "parse_mix", "run_load", "run_load_async"]

DESCRIPTION = "Open-loop load generator for BillingService, with a correctness check of the money at the end."
OPS = ("query", "pay", "cancel", "autodebit")
RATE_MAX_PER_S = 50_000.0
DURATION_MAX_S = 3_600.0
CONCURRENCY_MAX = 10_000
ARRIVALS_MAX = 5_000_000          # bounds the run's ledger and counters
CANCEL_CANDIDATES_MAX = 100_000   # accepted pays kept as cancel candidates (oldest forgotten first)
DISCREPANCIES_KEPT_MAX = 1_000    # kept in the result; the count covers all
DISCREPANCIES_SHOWN_MAX = 50      # printed
CHECK_FETCH_ROWS = 10_000         # rows per fetch when reading the MIS
PROGRESS_INTERVAL_S = 0.5
CONSOLE_WIDTH_MIN = 120
START_LEAD_S = 0.05               # first arrival this long after the scheduler starts
SERIAL_PREFIX_LEN_MAX = 12        # prefix + 'P' + 8 digits + margin stays within the 32-character serial rule
SERIAL_DIGITS = 8

# Retrying these with the same serial is safe and needed: the call may or may
# not have been applied. RESOURCE_EXHAUSTED is not among them: nothing was
# written, and a load test must show the server shedding load, not hide it.
IN_DOUBT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
})
DROPPED = "DROPPED"

# A pay's outcome as the run saw it, and its cancel's.
PENDING, ACCEPTED, REFUSED, IN_DOUBT = "PENDING", "ACCEPTED", "REFUSED", "IN_DOUBT"
CANCEL_NONE, CANCEL_REVERSED, CANCEL_REFUSED, CANCEL_NOT_FOUND, CANCEL_IN_DOUBT = (
    "", "REVERSED", "REFUSED", "ORIGINAL_NOT_FOUND", "IN_DOUBT")
# Payment states as the MIS stores them.
MIS_POSTED, MIS_REVERSED, MIS_TOMBSTONE = "POSTED", "REVERSED", "TOMBSTONE"


def parse_mix(text: str) -> dict[str, float]:
    """'query=50,pay=35,cancel=5,autodebit=10' -> shares summing to 1."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in OPS:
            raise ValueError(f"mix: {part!r} is not <op>=<weight> with op one of {', '.join(OPS)}")
        if name in weights:
            raise ValueError(f"mix: {name} given twice")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"mix: weight of {name} is not a number") from None
        if not 0 <= w < float("inf"):
            raise ValueError(f"mix: weight of {name} must be a finite number >= 0")
        weights[name] = w
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("mix: the weights must add up to more than 0")
    return {op: weights.get(op, 0.0) / total for op in OPS}


class LoadProfile(LinkSettings):
    """Everything one load run does. Built from flags/env/TOML by `main`, or directly by a benchmark."""

    roster: str = Field("", description="the bank's roster CSV (header line, account_no column): accounts to use")
    rate_per_s: float = Field(100.0, gt=0, le=RATE_MAX_PER_S, description="offered arrivals per second")
    duration_s: float = Field(10.0, gt=0, le=DURATION_MAX_S, description="measured time, after the warm-up")
    warmup_s: float = Field(2.0, ge=0, le=DURATION_MAX_S, description="unmeasured time before it")
    concurrency: int = Field(64, ge=1, le=CONCURRENCY_MAX,
                             description="calls in flight at most; an arrival finding none free is dropped")
    mix: str = Field("query=50,pay=35,cancel=5,autodebit=10", description="shares of query/pay/cancel/autodebit")
    allow_host: list[str] = Field(default_factory=list, description="non-loopback host the load may target (repeatable)")
    force_insecure: bool = Field(False, description="allow plain text to a non-loopback target")
    mis_db: list[str] = Field(default_factory=list,
                              description="MIS database URL (repeatable, one per branch DB) for the check; "
                                          "without it the check asks GetPayment through the target")
    check: bool = Field(True, description="run the correctness check at the end")
    pay_min_fen: int = Field(100, ge=1, description="smallest pay")
    pay_max_fen: int = Field(50_000, ge=1, le=1_000_000_000, description="largest pay")
    outlet_code: str = Field("LOAD01", max_length=16, description="outlet code on the run's pays")
    teller_id: str = Field("LOADGEN", max_length=16, description="teller id on the run's pays")
    seed: int = Field(1, description="random seed (operation order, accounts, amounts)")
    serial_prefix: str = Field("", max_length=SERIAL_PREFIX_LEN_MAX, pattern=r"^[A-Za-z0-9]*$",
                               description="prefix of the run's serials (default: random, unique per run)")
    drain_s: float = Field(15.0, gt=0, description="longest wait for in-flight calls after the last arrival")
    latency_max_s: float = Field(60.0, gt=0, description="largest latency the histograms record (larger are clamped)")
    check_concurrency: int = Field(16, ge=1, le=1_000, description="calls in flight while resolving and checking")
    resolve_s: float = Field(60.0, gt=0, description="longest the end-of-run resend of what is in doubt may take "
                                                     "(and, separately, the GetPayment check)")
    progress: bool = Field(True, description="live progress bar on stderr")

    @field_validator("mix")
    @classmethod
    def _mix_parses(cls, value: str) -> str:
        parse_mix(value)
        return value

    @model_validator(mode="after")
    def _bounds(self) -> LoadProfile:
        if self.pay_min_fen > self.pay_max_fen:
            raise ValueError("pay_min_fen must not exceed pay_max_fen")
        arrivals = self.rate_per_s * (self.warmup_s + self.duration_s)
        if arrivals > ARRIVALS_MAX:
            raise ValueError(f"rate x (warm-up + duration) = {arrivals:,.0f} arrivals; at most {ARRIVALS_MAX:,}")
        return self


def check_target_allowed(target: str, allow_hosts: Iterable[str]) -> None:
    """Loopback targets only, unless the host is explicitly allowed."""
    host = target.rsplit(":", 1)[0].strip("[]")
    if is_loopback(target) or host in set(allow_hosts):
        return
    raise SystemExit(f"refusing to load {target}: not loopback; name the host with --allow-host to allow it")


# ---- the run's ledger of pays ----

@dataclass(slots=True)
class PayRecord:
    account_no: str
    amount_fen: int
    channel: str
    outcome: str = PENDING
    code: str = ""
    cancel: str = CANCEL_NONE
    cancel_serial: str = ""


@dataclass
class RunLedger:
    """Every pay the run sent, by serial, with what the target answered."""

    prefix: str
    bank_id: str
    target: str
    pays: dict[str, PayRecord] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"prefix": self.prefix, "bank_id": self.bank_id, "target": self.target,
                                "pays": len(self.pays)}) + "\n")
            for serial, r in self.pays.items():
                f.write(json.dumps([serial, r.account_no, r.amount_fen, r.channel, r.outcome, r.code, r.cancel,
                                    r.cancel_serial]) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunLedger:
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
            ledger = cls(head["prefix"], head["bank_id"], head["target"])
            for n, line in enumerate(f, start=2):
                if n - 1 > ARRIVALS_MAX:
                    raise ValueError(f"{path}: more than {ARRIVALS_MAX} pays")
                serial, account_no, amount_fen, channel, outcome, code, cancel, cancel_serial = json.loads(line)
                ledger.pays[serial] = PayRecord(account_no, int(amount_fen), channel, outcome, code, cancel,
                                                cancel_serial)
        return ledger


# ---- the correctness check ----

@dataclass(frozen=True)
class Discrepancy:
    bank_serial: str
    kind: str
    detail: str


@dataclass(frozen=True)
class MisRow:
    state: str
    amount_fen: int
    account_no: str


@dataclass
class CheckResult:
    source: str
    pays_checked: int = 0
    accepted: int = 0
    accepted_fen: int = 0
    cancelled: int = 0
    cancelled_fen: int = 0
    mis_posted: int = 0
    mis_posted_fen: int = 0
    discrepancy_count: int = 0
    discrepancies: list[Discrepancy] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.discrepancy_count == 0

    def add(self, serial: str, kind: str, detail: str) -> None:
        self.discrepancy_count += 1
        if len(self.discrepancies) < DISCREPANCIES_KEPT_MAX:
            self.discrepancies.append(Discrepancy(serial, kind, detail))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def compare(ledger: RunLedger, mis: dict[str, list[MisRow]], source: str, *, mis_complete: bool) -> CheckResult:
    """The run's ledger against what the MIS holds for its serials. `mis_complete`: the view holds every
    row with the run's prefix (read from the database), so rows the run never sent are flagged too."""
    res = CheckResult(source)
    for serial, rec in ledger.pays.items():
        rows = mis.get(serial, [])
        posted = [r for r in rows if r.state == MIS_POSTED]
        res.pays_checked += 1
        res.mis_posted += len(posted)
        res.mis_posted_fen += sum(r.amount_fen for r in posted)
        if rec.outcome == ACCEPTED:
            _check_accepted(res, serial, rec, rows)
        elif rec.outcome == REFUSED:
            if posted:
                res.add(serial, "REFUSED_BUT_POSTED", f"the target answered {rec.code}, the MIS has it POSTED")
        else:
            res.add(serial, "PAY_IN_DOUBT", f"no definite answer for this pay (last {rec.code or 'none'})")
    if mis_complete:
        for serial, rows in mis.items():
            if serial not in ledger.pays and any(r.state == MIS_POSTED for r in rows):
                posted = [r for r in rows if r.state == MIS_POSTED]
                res.mis_posted += len(posted)
                res.mis_posted_fen += sum(r.amount_fen for r in posted)
                res.add(serial, "UNKNOWN_POSTED", "POSTED in the MIS under the run's prefix, never sent by the run")
    expected_fen = res.accepted_fen - res.cancelled_fen
    if expected_fen != res.mis_posted_fen:
        res.add("*", "SUM_MISMATCH", f"accepted {res.accepted_fen} - cancelled {res.cancelled_fen} = {expected_fen} "
                                     f"fen, MIS POSTED {res.mis_posted_fen} fen (off by "
                                     f"{res.mis_posted_fen - expected_fen})")
    return res


def _check_accepted(res: CheckResult, serial: str, rec: PayRecord, rows: list[MisRow]) -> None:
    res.accepted += 1
    res.accepted_fen += rec.amount_fen
    if rec.cancel == CANCEL_REVERSED:
        res.cancelled += 1
        res.cancelled_fen += rec.amount_fen
    if rec.cancel == CANCEL_IN_DOUBT:
        res.add(serial, "CANCEL_IN_DOUBT", f"no definite answer for cancel {rec.cancel_serial}")
    if not rows:
        res.add(serial, "MISSING", f"accepted {rec.amount_fen} fen on {rec.account_no}, not in the MIS")
        return
    if len(rows) > 1:
        res.add(serial, "DUPLICATE", f"{len(rows)} rows in the MIS")
        return
    row = rows[0]
    expected = MIS_REVERSED if rec.cancel == CANCEL_REVERSED else MIS_POSTED
    if rec.cancel != CANCEL_IN_DOUBT and row.state != expected:
        res.add(serial, "WRONG_STATE", f"expected {expected}, the MIS has {row.state}")
    if row.amount_fen != rec.amount_fen:
        res.add(serial, "WRONG_AMOUNT", f"accepted {rec.amount_fen} fen, the MIS has {row.amount_fen}")
    if row.account_no != rec.account_no:
        res.add(serial, "WRONG_ACCOUNT", f"accepted on {rec.account_no}, the MIS has {row.account_no}")


def read_mis(urls: Sequence[str], bank_id: str, prefix: str) -> dict[str, list[MisRow]]:
    """Every payment row of the bank under the run's prefix, over all branch databases (read only)."""
    from mis_adapter.db.core import Payment  # the MIS's own schema: the check reads exactly what it stores

    p = Payment.__table__.c
    stmt = (sa.select(p.bank_serial, p.state, p.amount_fen, p.account_no)
            .where(p.bank_id == bank_id, p.bank_serial.like(prefix + "%")))
    out: dict[str, list[MisRow]] = {}
    for url in urls:
        engine = make_engine(url, pool_size=1)
        try:
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True).execute(stmt)
                for part in result.partitions(CHECK_FETCH_ROWS):
                    for serial, state, amount_fen, account_no in part:
                        out.setdefault(serial, []).append(MisRow(state, int(amount_fen), account_no or ""))
        finally:
            engine.dispose()
    return out


_PB_STATES = {billing_pb2.PAYMENT_STATE_POSTED: MIS_POSTED, billing_pb2.PAYMENT_STATE_REVERSED: MIS_REVERSED,
              billing_pb2.PAYMENT_STATE_REFUSED: MIS_TOMBSTONE}


async def read_via_get_payment(client: _Client, ledger: RunLedger, concurrency: int, within_s: float
                               ) -> tuple[dict[str, list[MisRow]], list[Discrepancy]]:
    """GetPayment through the target for every pay of the ledger, within `within_s`."""
    out: dict[str, list[MisRow]] = {}
    failures: list[Discrepancy] = []
    asked: set[str] = set()
    until = asyncio.get_running_loop().time() + within_s

    async def one(serial: str, rec: PayRecord) -> None:
        asked.add(serial)
        code, resp = await client.call_until_definite(client.stub.GetPayment,
                                                      billing_pb2.GetPaymentRequest(bank_serial=serial), until)
        if code != "OK" or resp is None:
            failures.append(Discrepancy(serial, "UNCHECKED", f"GetPayment answered {code}"))
            return
        state = _PB_STATES.get(resp.state)
        if state is not None:
            amount = resp.payment.amount_fen if resp.HasField("payment") else rec.amount_fen
            account = resp.payment.account_no if resp.HasField("payment") else rec.account_no
            out[serial] = [MisRow(state, amount, account)]

    checkable = [(s, r) for s, r in ledger.pays.items() if r.outcome in (ACCEPTED, REFUSED)]
    await _bounded_gather((functools.partial(one, s, r) for s, r in checkable), concurrency, until)
    failures += [Discrepancy(s, "UNCHECKED", f"not asked within {within_s:g} s") for s, _ in checkable
                 if s not in asked]
    return out, failures


async def _bounded_gather(jobs: Iterable[Callable[[], Awaitable[None]]], concurrency: int, until: float) -> None:
    """Runs the jobs with at most `concurrency` at a time; none starts after `until` (loop time)."""
    it = iter(jobs)
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        for job in it:
            if loop.time() >= until:
                return
            await job()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# ---- the client ----

class _Client:
    """One aio channel; calls with deadlines and same-serial retries of in-doubt answers."""

    def __init__(self, profile: LoadProfile) -> None:
        check_target_allowed(profile.target, profile.allow_host)
        opts = channel_options()
        if profile.tls_cert and profile.tls_key and profile.tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(profile.tls_ca).read_bytes(),
                                                 private_key=Path(profile.tls_key).read_bytes(),
                                                 certificate_chain=Path(profile.tls_cert).read_bytes())
            self.channel = grpc.aio.secure_channel(profile.target, creds, options=opts)
            self.metadata: tuple[tuple[str, str], ...] = ()
        elif profile.insecure:
            check_plaintext_allowed(profile.target, profile.force_insecure)
            self.channel = grpc.aio.insecure_channel(profile.target, options=opts)
            self.metadata = ((BANK_ID_METADATA, profile.bank_id),)
        else:
            raise SystemExit("no TLS files given: pass --tls-cert/--tls-key/--tls-ca, or --insecure on loopback")
        self.stub = billing_pb2_grpc.BillingServiceStub(self.channel)
        self.deadline_s = profile.rpc_deadline_s
        self.attempts_max = profile.retry_max_attempts
        self.backoff_base_s = profile.retry_backoff_base_s
        self.backoff_cap_s = profile.retry_backoff_cap_s
        self.jitter = random.Random(profile.seed ^ 0x5EED)
        self.retries = 0

    async def call(self, method: Any, req: Any) -> tuple[str, Any]:
        try:
            return "OK", await method(req, timeout=self.deadline_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, None

    async def call_until_definite(self, method: Any, req: Any, retry_until: float | None) -> tuple[str, Any]:
        """Resends the same request while the answer is in doubt, within the attempt and time bounds."""
        loop = asyncio.get_running_loop()
        code, resp = await self.call(method, req)
        attempt = 1
        while is_in_doubt(code):
            if attempt >= self.attempts_max:
                break
            backoff_s = self._backoff_s(attempt)
            if retry_until is not None and loop.time() + backoff_s >= retry_until:
                break
            await asyncio.sleep(backoff_s)
            self.retries += 1
            attempt += 1
            code, resp = await self.call(method, req)
        return code, resp

    def _backoff_s(self, attempt: int) -> float:
        cap = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1))
        return cap / 2 + self.jitter.uniform(0, cap / 2)

    async def close(self) -> None:
        await self.channel.close()


def is_in_doubt(code: str) -> bool:
    return code != "OK" and grpc.StatusCode[code] in IN_DOUBT_CODES


# ---- statistics ----

@dataclass
class OpStats:
    latency: LatencyHistogram
    codes: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def errors(self) -> int:
        return sum(n for c, n in self.codes.items() if c not in ("OK", DROPPED))


@dataclass
class OpReport:
    count: int
    rate_per_s: float
    latency: LatencySummary
    codes: dict[str, int]


@dataclass
class LoadResult:
    target: str
    bank_id: str
    serial_prefix: str
    started_at: str
    offered_rate_per_s: float
    duration_s: float
    warmup_s: float
    concurrency: int
    mix: dict[str, float]
    arrivals: int                  # measured arrivals (issued + dropped)
    issued: int
    dropped: int
    completed: int
    ok: int
    rate_per_s: float              # measured completions per second of the measured span
    span_s: float
    retries: int
    cancel_fallbacks: int          # cancels with no accepted pay left to reverse: sent as queries
    scheduler_lag_max_ms: float    # how late the generator issued an arrival at worst
    latency: LatencySummary
    ops: dict[str, OpReport]
    codes: dict[str, int]
    pays_sent: int
    pays_accepted: int
    pays_in_doubt_after_run: int
    load_average: tuple[float, float, float]
    calls_total: int = 0           # every call answered, warm-up included (for CPU per call)
    generator_cpu_s: float = 0.0   # this process's CPU (all threads) while the load ran
    check: CheckResult | None = None
    histogram: str = ""            # HdrHistogram encoding of all measured latencies

    def sustained(self, p99_max_ms: float, ok_share_min: float = 0.99, rate_share_min: float = 0.95) -> bool:
        """Whether the offered rate was carried: nothing dropped, nearly all OK, p99 under the bound."""
        return (self.dropped == 0 and self.completed > 0 and self.ok >= ok_share_min * self.completed
                and self.rate_per_s >= rate_share_min * self.offered_rate_per_s
                and self.latency.p99_ms < p99_max_ms)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.check is not None:
            out["check"] = self.check.to_json()
        return out


# ---- the run ----

class _Run:
    """One load run on the running event loop."""

    def __init__(self, profile: LoadProfile, accounts: Sequence[str], client: _Client, prefix: str) -> None:
        if not accounts:
            raise ValueError("no accounts to load: the roster is empty")
        self.p = profile
        self.accounts = list(accounts)
        self.client = client
        self.prefix = prefix
        self.ledger = RunLedger(prefix, profile.bank_id, profile.target)
        shares = parse_mix(profile.mix)
        self.ops = [op for op in OPS if shares[op] > 0]
        self.op_cum_weights = list(itertools.accumulate(shares[op] for op in self.ops))
        self.rng = random.Random(profile.seed)
        self.stats = {op: OpStats(LatencyHistogram(profile.latency_max_s)) for op in OPS}
        self.cancelable: collections.deque[str] = collections.deque(maxlen=CANCEL_CANDIDATES_MAX)
        self.in_flight = 0
        self.pay_n = 0
        self.cancel_n = 0
        self.issued = 0
        self.dropped = 0
        self.cancel_fallbacks = 0
        self.lag_max_s = 0.0
        self.done_total = 0
        self.errors_total = 0
        self.t0 = 0.0
        self.measure_from = 0.0
        self.measure_to = 0.0
        self.last_done = 0.0
        self.retry_until = 0.0
        self.cpu_s = 0.0

    # -- scheduling --

    async def run(self, progress: Progress | None) -> None:
        loop = asyncio.get_running_loop()
        interval_s = 1.0 / self.p.rate_per_s
        total = int(self.p.rate_per_s * (self.p.warmup_s + self.p.duration_s))
        warmup_n = int(self.p.rate_per_s * self.p.warmup_s)
        t0 = loop.time() + START_LEAD_S
        self.t0 = t0
        self.measure_from = t0 + warmup_n * interval_s
        self.measure_to = t0 + total * interval_s
        self.retry_until = self.measure_to + self.p.drain_s
        tasks: set[asyncio.Task[None]] = set()
        ticker = loop.create_task(self._progress(progress, total)) if progress else None
        i = 0
        while i < total:
            now = loop.time()
            while i < total and (intended := t0 + i * interval_s) <= now:
                self._arrive(tasks, intended, measured=i >= warmup_n, now=now)
                i += 1
            if i < total:
                await asyncio.sleep(t0 + i * interval_s - loop.time())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=max(0.0, self.retry_until - loop.time()))
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        if ticker:
            ticker.cancel()
            self._show(progress, total, self.done_total / max(loop.time() - t0, 1e-9))  # the run's average

    def _arrive(self, tasks: set[asyncio.Task[None]], intended: float, *, measured: bool, now: float) -> None:
        op = self.rng.choices(self.ops, cum_weights=self.op_cum_weights)[0]
        if op == "cancel" and not self.cancelable:
            op = "query"
            self.cancel_fallbacks += 1
        if self.in_flight >= self.p.concurrency:
            if measured:
                self.dropped += 1
                self.stats[op].codes[DROPPED] += 1
            return
        self.lag_max_s = max(self.lag_max_s, now - intended)
        if measured:
            self.issued += 1
        self.in_flight += 1
        # the pay to reverse is taken now, so that two cancels issued together never pick the same one
        original = self.cancelable.pop() if op == "cancel" else ""
        task = asyncio.get_running_loop().create_task(self._op(op, intended, measured, original))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _op(self, op: str, intended: float, measured: bool, original: str) -> None:
        code = "CANCELLED"
        try:
            if op == "query":
                code = await self._query()
            elif op == "cancel":
                code = await self._cancel(original)
            else:
                code = await self._pay(billing_pb2.CHANNEL_AUTO_DEBIT if op == "autodebit"
                                       else billing_pb2.CHANNEL_COUNTER)
        finally:
            self.in_flight -= 1
            now = asyncio.get_running_loop().time()
            self.done_total += 1
            if code != "OK":
                self.errors_total += 1
            if measured:
                st = self.stats[op]
                st.latency.record_s(now - intended)
                st.codes[code] += 1
                self.last_done = max(self.last_done, now)

    # -- operations --

    async def _query(self) -> str:
        req = billing_pb2.QueryAccountRequest(account_no=self.rng.choice(self.accounts))
        code, _ = await self.client.call(self.client.stub.QueryAccount, req)
        return code

    async def _pay(self, channel: int) -> str:
        self.pay_n += 1
        serial = f"{self.prefix}P{self.pay_n:0{SERIAL_DIGITS}d}"
        rec = PayRecord(self.rng.choice(self.accounts), self.rng.randint(self.p.pay_min_fen, self.p.pay_max_fen),
                        billing_pb2.Channel.Name(channel).removeprefix("CHANNEL_"))
        self.ledger.pays[serial] = rec
        code, _ = await self.client.call_until_definite(self.client.stub.Pay, self._pay_request(serial, rec),
                                                        self.retry_until)
        self._settle_pay(serial, rec, code)
        return code

    def _pay_request(self, serial: str, rec: PayRecord) -> billing_pb2.PayRequest:
        return billing_pb2.PayRequest(
            bank_serial=serial, account_no=rec.account_no, amount_fen=rec.amount_fen, outlet_code=self.p.outlet_code,
            teller_id=self.p.teller_id, channel=billing_pb2.Channel.Value("CHANNEL_" + rec.channel))

    def _settle_pay(self, serial: str, rec: PayRecord, code: str) -> None:
        rec.code = code
        if code == "OK":
            rec.outcome = ACCEPTED
            self.cancelable.append(serial)
        else:
            rec.outcome = IN_DOUBT if is_in_doubt(code) else REFUSED

    async def _cancel(self, original: str) -> str:
        rec = self.ledger.pays[original]
        self.cancel_n += 1
        rec.cancel_serial = f"{self.prefix}C{self.cancel_n:0{SERIAL_DIGITS}d}"
        rec.cancel = CANCEL_IN_DOUBT
        code, resp = await self.client.call_until_definite(self.client.stub.Cancel, self._cancel_request(original, rec),
                                                           self.retry_until)
        self._settle_cancel(rec, code, resp)
        return code

    @staticmethod
    def _cancel_request(original: str, rec: PayRecord) -> billing_pb2.CancelRequest:
        return billing_pb2.CancelRequest(cancel_serial=rec.cancel_serial, original_serial=original,
                                         amount_fen=rec.amount_fen, reason="load test reversal")

    @staticmethod
    def _settle_cancel(rec: PayRecord, code: str, resp: billing_pb2.CancelResponse | None) -> None:
        if code == "OK" and resp is not None:
            rec.cancel = (CANCEL_REVERSED if resp.outcome == billing_pb2.CANCEL_OUTCOME_REVERSED
                          else CANCEL_NOT_FOUND)
        else:
            rec.cancel = CANCEL_IN_DOUBT if is_in_doubt(code) else CANCEL_REFUSED

    # -- after the run --

    async def resolve_in_doubt(self) -> None:
        """Resends every pay and cancel still in doubt with its own serial (DESIGN.md semantic 3)."""
        until = asyncio.get_running_loop().time() + self.p.resolve_s

        async def pay(serial: str, rec: PayRecord) -> None:
            code, _ = await self.client.call_until_definite(self.client.stub.Pay, self._pay_request(serial, rec), until)
            self._settle_pay(serial, rec, code)

        async def cancel(serial: str, rec: PayRecord) -> None:
            code, resp = await self.client.call_until_definite(self.client.stub.Cancel,
                                                               self._cancel_request(serial, rec), until)
            self._settle_cancel(rec, code, resp)

        # What stays in doubt after `resolve_s` is reported by the check (PAY_IN_DOUBT, CANCEL_IN_DOUBT).
        pays = self.ledger.pays.items()
        await _bounded_gather([functools.partial(pay, s, r) for s, r in pays if r.outcome in (IN_DOUBT, PENDING)],
                              self.p.check_concurrency, until)
        await _bounded_gather([functools.partial(cancel, s, r) for s, r in pays
                               if r.outcome == ACCEPTED and r.cancel == CANCEL_IN_DOUBT], self.p.check_concurrency,
                              until)

    # -- progress --

    async def _progress(self, progress: Progress | None, total: int) -> None:
        assert progress is not None
        loop = asyncio.get_running_loop()
        last_done, last_t = 0, loop.time()
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            now = loop.time()
            rate = (self.done_total - last_done) / max(now - last_t, 1e-9)
            last_done, last_t = self.done_total, now
            self._show(progress, total, rate)

    def _show(self, progress: Progress | None, total: int, rate: float = 0.0) -> None:
        if progress is None:
            return
        loop = asyncio.get_running_loop()
        phase = "warm-up" if loop.time() < self.measure_from else "load" if loop.time() < self.measure_to else "drain"
        sent = min(total, int(max(0.0, loop.time() - self.t0) * self.p.rate_per_s) + 1)
        progress.update(progress.task_ids[0], completed=sent, phase=phase, rate=rate, errors=self.errors_total,
                        in_flight=self.in_flight, dropped=self.dropped)
        progress.refresh()

    # -- the result --

    def result(self, started_at: str, check: CheckResult | None, load_average: tuple[float, float, float]
               ) -> LoadResult:
        overall = LatencyHistogram(self.p.latency_max_s)
        codes: collections.Counter[str] = collections.Counter()
        for st in self.stats.values():
            overall.merge(st.latency)
            codes.update(st.codes)
        span_s = max(self.p.duration_s, self.last_done - self.measure_from)
        ops = {op: OpReport(st.latency.count, round(st.latency.count / span_s, 1), st.latency.summary(),
                            dict(st.codes)) for op, st in self.stats.items() if st.codes}
        completed = overall.count
        accepted = sum(1 for r in self.ledger.pays.values() if r.outcome == ACCEPTED)
        in_doubt = sum(1 for r in self.ledger.pays.values() if r.outcome in (IN_DOUBT, PENDING))
        return LoadResult(
            target=self.p.target, bank_id=self.p.bank_id, serial_prefix=self.prefix, started_at=started_at,
            offered_rate_per_s=self.p.rate_per_s, duration_s=self.p.duration_s, warmup_s=self.p.warmup_s,
            concurrency=self.p.concurrency, mix=parse_mix(self.p.mix), arrivals=self.issued + self.dropped,
            issued=self.issued, dropped=self.dropped, completed=completed, ok=codes.get("OK", 0),
            rate_per_s=round(completed / span_s, 1), span_s=round(span_s, 3), retries=self.client.retries,
            cancel_fallbacks=self.cancel_fallbacks, scheduler_lag_max_ms=round(self.lag_max_s * 1000, 3),
            latency=overall.summary(), ops=ops, codes=dict(codes), pays_sent=len(self.ledger.pays),
            pays_accepted=accepted, pays_in_doubt_after_run=in_doubt, load_average=load_average,
            calls_total=self.done_total, generator_cpu_s=round(self.cpu_s, 3), check=check,
            histogram=overall.encode())


def _new_prefix() -> str:
    return "L" + secrets.token_hex(4)


def _make_progress(console: Console, total: int) -> Progress:
    progress = Progress(
        TextColumn("[bold]{task.fields[phase]:<7}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[rate]:>7.0f} calls/s  errors {task.fields[errors]}  "
                   "in flight {task.fields[in_flight]}  dropped {task.fields[dropped]}"),
        console=console, auto_refresh=False, transient=False)
    progress.add_task("load", total=total, phase="start", rate=0.0, errors=0, in_flight=0, dropped=0)
    return progress


async def run_load_async(profile: LoadProfile, accounts: Sequence[str] | None = None, *,
                         console: Console | None = None) -> tuple[LoadResult, RunLedger]:
    """One run on the running loop: load, resolve what is in doubt, check. Returns the result and the ledger."""
    check_target_allowed(profile.target, profile.allow_host)
    accounts = accounts if accounts is not None else read_roster(profile.roster)
    client = _Client(profile)
    started_at = make_clock(None).now().isoformat(timespec="seconds")
    run = _Run(profile, accounts, client, profile.serial_prefix or _new_prefix())
    total = int(profile.rate_per_s * (profile.warmup_s + profile.duration_s))
    progress = _make_progress(console or Console(stderr=True), total) if profile.progress else None
    try:
        if progress:
            progress.start()
        cpu_before_s = time.process_time()
        try:
            await run.run(progress)
        finally:
            if progress:
                progress.stop()
        run.cpu_s = time.process_time() - cpu_before_s
        load_average = os.getloadavg()
        await run.resolve_in_doubt()
        check = await _check(profile, run.ledger, client) if profile.check else None
    finally:
        await client.close()
    return run.result(started_at, check, load_average), run.ledger


def run_load(profile: LoadProfile, accounts: Sequence[str] | None = None, *,
             console: Console | None = None) -> LoadResult:
    """One load run from synchronous code (its own event loop)."""
    return asyncio.run(run_load_async(profile, accounts, console=console))[0]


async def _check(profile: LoadProfile, ledger: RunLedger, client: _Client | None) -> CheckResult:
    if profile.mis_db:
        mis = await asyncio.to_thread(read_mis, profile.mis_db, ledger.bank_id, ledger.prefix)
        return compare(ledger, mis, "mis-db", mis_complete=True)
    own = client is None
    client = client or _Client(profile)
    try:
        mis, failures = await read_via_get_payment(client, ledger, profile.check_concurrency, profile.resolve_s)
    finally:
        if own:
            await client.close()
    res = compare(ledger, mis, "GetPayment", mis_complete=False)
    for d in failures:
        res.add(d.bank_serial, d.kind, d.detail)
    return res


def check_ledger(profile: LoadProfile, ledger: RunLedger) -> CheckResult:
    """Re-checks a saved ledger (after the fact, e.g. after reconciliation or an incident)."""
    return asyncio.run(_check(profile, ledger, None))


# ---- reporting ----

def _us_per_call(cpu_s: float, calls: int) -> str:
    return f"{cpu_s / calls * 1e6:,.0f}" if calls else "-"


def _ms(v: float) -> str:
    return f"{v:,.2f}"


def result_tables(r: LoadResult) -> list[Table]:
    head = Table(title=f"load {r.target} bank {r.bank_id}: offered {r.offered_rate_per_s:,.0f}/s for "
                       f"{r.duration_s:g} s (+{r.warmup_s:g} s warm-up), concurrency {r.concurrency}", show_header=False)
    head.add_column("what")
    head.add_column("value", justify="right")
    for k, v in (("arrivals (measured)", f"{r.arrivals:,}"), ("issued", f"{r.issued:,}"),
                 ("dropped (no free slot)", f"{r.dropped:,}"), ("completed", f"{r.completed:,}"),
                 ("rate", f"{r.rate_per_s:,.1f}/s over {r.span_s:g} s"), ("OK", f"{r.ok:,}"),
                 ("retries (same serial)", f"{r.retries:,}"), ("scheduler lag max", f"{r.scheduler_lag_max_ms:,.2f} ms"),
                 ("generator CPU", f"{r.generator_cpu_s:.2f} s, {_us_per_call(r.generator_cpu_s, r.calls_total)} µs/call"),
                 ("load average", " ".join(f"{x:.2f}" for x in r.load_average))):
        head.add_row(k, v)
    lat = Table(title="latency from intended send time (ms)")
    for col in ("op", "count", "rate/s", "fastest", "mean", "slowest", "p50", "p90", "p99", "p99.9", "errors"):
        lat.add_column(col, justify="left" if col == "op" else "right")
    rows = [(op, o.count, o.rate_per_s, o.latency, o.codes) for op, o in r.ops.items()]
    rows.append(("all", r.completed, r.rate_per_s, r.latency, r.codes))
    for op, count, rate, s, codes in rows:
        errors = sum(n for c, n in codes.items() if c not in ("OK", DROPPED))
        lat.add_row(op, f"{count:,}", f"{rate:,.1f}", _ms(s.fastest_ms), _ms(s.mean_ms), _ms(s.slowest_ms),
                    _ms(s.p50_ms), _ms(s.p90_ms), _ms(s.p99_ms), _ms(s.p999_ms), f"{errors:,}")
    dist = Table(title="status code distribution")
    dist.add_column("op")
    dist.add_column("code")
    dist.add_column("count", justify="right")
    for op, o in r.ops.items():
        for code, n in sorted(o.codes.items(), key=lambda kv: -kv[1]):
            dist.add_row(op, code, f"{n:,}")
    return [head, lat, dist]


def print_check(console: Console, c: CheckResult) -> None:
    verdict = "[green]OK[/green]" if c.ok else f"[red]FAILED: {c.discrepancy_count} discrepancies[/red]"
    console.print(f"check ({c.source}): {verdict} — {c.pays_checked:,} pays; accepted {c.accepted:,} "
                  f"({c.accepted_fen:,} fen), cancelled {c.cancelled:,} ({c.cancelled_fen:,} fen), "
                  f"MIS POSTED {c.mis_posted:,} ({c.mis_posted_fen:,} fen)")
    for d in c.discrepancies[:DISCREPANCIES_SHOWN_MAX]:
        console.print(f"  DISCREPANCY {d.kind} serial={d.bank_serial} {d.detail}", markup=False, highlight=False,
                      soft_wrap=True)
    if c.discrepancy_count > DISCREPANCIES_SHOWN_MAX:
        console.print(f"  ... and {c.discrepancy_count - DISCREPANCIES_SHOWN_MAX} more")


# ---- command line ----

CUSTOM_FLAGS = frozenset({"rate_per_s", "duration_s", "warmup_s", "mix", "allow_host", "mis_db"})


def parse(argv: list[str]) -> tuple[LoadProfile, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bank_sim load", description=DESCRIPTION)
    parser.add_argument("--rate", dest="rate_per_s", type=float, default=None, help="offered arrivals per second")
    parser.add_argument("--duration", dest="duration_s", type=float, default=None, help="measured seconds")
    parser.add_argument("--warmup", dest="warmup_s", type=float, default=None, help="unmeasured warm-up seconds")
    parser.add_argument("--mix", default=None,
                        help="shares of query/pay/cancel/autodebit, e.g. query=50,pay=35,cancel=5,autodebit=10 "
                             "(autodebit = Pay on the AUTO_DEBIT channel; cancel reverses an earlier pay of the run)")
    parser.add_argument("--allow-host", dest="allow_host", action="append", default=None,
                        help="a non-loopback host the load may target (repeatable)")
    parser.add_argument("--mis-db", dest="mis_db", action="append", default=None,
                        help="MIS database URL for the check (repeatable: one per branch database)")
    parser.add_argument("--json", dest="json_out", nargs="?", const="-", default=None,
                        help="write the result as JSON to FILE, or to stdout (tables then go to stderr)")
    parser.add_argument("--save-ledger", default=None, help="write the run's pays (JSON lines) here")
    parser.add_argument("--check-ledger", default=None,
                        help="send no load: re-check a saved ledger against --mis-db (or GetPayment via --target)")
    add_settings_flags(parser, LoadProfile, skip=CUSTOM_FLAGS)
    args = parser.parse_args(argv)
    return load_settings(LoadProfile, args, args.config_file), args


def _console(*, stderr: bool) -> Console:
    """Wide enough for the latency table even when piped."""
    return Console(stderr=stderr, width=max(Console(stderr=stderr).width, CONSOLE_WIDTH_MIN))


def _write_json(target: str, payload: dict[str, Any], out: TextIO) -> None:
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    if target == "-":
        out.write(text + "\n")
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    try:
        profile, args = parse(argv)
    except ValidationError as exc:
        for e in exc.errors():
            print(f"error: {'.'.join(str(x) for x in e['loc']) or 'profile'}: {e['msg']}", file=sys.stderr)
        return 2
    console = _console(stderr=args.json_out == "-")
    if args.check_ledger:
        ledger = RunLedger.load(args.check_ledger)
        check = check_ledger(profile, ledger)
        print_check(console, check)
        if args.json_out:
            _write_json(args.json_out, check.to_json(), sys.stdout)
        return 0 if check.ok else 1
    check_target_allowed(profile.target, profile.allow_host)
    if not profile.roster:
        print("error: --roster is required (the bank's roster CSV)", file=sys.stderr)
        return 2
    try:
        accounts = read_roster(profile.roster)
    except (OSError, ValueError) as exc:
        print(f"error: --roster: {exc}", file=sys.stderr)
        return 2
    result, ledger = asyncio.run(run_load_async(profile, accounts, console=_console(stderr=True)))
    for table in result_tables(result):
        console.print(table)
    if result.check is not None:
        print_check(console, result.check)
    if args.save_ledger:
        ledger.save(args.save_ledger)
    if args.json_out:
        _write_json(args.json_out, result.to_json(), sys.stdout)
    return 0 if result.check is None or result.check.ok else 1

