"""The open-loop scheduler and its statistics: arrivals at their intended instants, bounded
concurrency, the end-of-run resend of what is in doubt, then the check."""
from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import os
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bank_sim.histogram import LatencyHistogram, LatencySummary
from bank_sim.ledger import read_roster
from bank_sim.load.check import (
    CheckResult,
    PayRecord,
    RunLedger,
    bounded_gather,
    compare,
    read_mis,
    read_via_get_payment,
)
from bank_sim.load.client import LoadClient, is_in_doubt
from bank_sim.load.profile import (
    ACCEPTED,
    CANCEL_CANDIDATES_MAX,
    CANCEL_IN_DOUBT,
    CANCEL_NOT_FOUND,
    CANCEL_REFUSED,
    CANCEL_REVERSED,
    DROPPED,
    IN_DOUBT,
    OPS,
    PENDING,
    PROGRESS_INTERVAL_S,
    REFUSED,
    SERIAL_DIGITS,
    START_LEAD_S,
    LoadProfile,
    check_target_allowed,
    parse_mix,
)
from yindian.v1 import billing_pb2
from yindian_common.clock import make_clock

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

    def __init__(self, profile: LoadProfile, accounts: Sequence[str], client: LoadClient, prefix: str) -> None:
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
        await bounded_gather([functools.partial(pay, s, r) for s, r in pays if r.outcome in (IN_DOUBT, PENDING)],
                              self.p.check_concurrency, until)
        await bounded_gather([functools.partial(cancel, s, r) for s, r in pays
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
        # The span as reported (ms), and every rate from it: a reader dividing the printed figures gets the
        # printed rate (before, 50 calls over 0.5097 s printed 0.51 s and 98.1/s, not 98.0/s).
        span_s = round(max(self.p.duration_s, self.last_done - self.measure_from), 3)
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
            rate_per_s=round(completed / span_s, 1), span_s=span_s, retries=self.client.retries,
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
    client = LoadClient(profile)
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


async def _check(profile: LoadProfile, ledger: RunLedger, client: LoadClient | None) -> CheckResult:
    if profile.mis_db:
        mis = await asyncio.to_thread(read_mis, profile.mis_db, ledger.bank_id, ledger.prefix)
        return compare(ledger, mis, "mis-db", mis_complete=True)
    own = client is None
    client = client or LoadClient(profile)
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
