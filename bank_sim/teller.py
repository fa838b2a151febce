"""Teller sessions at the bank's counters (`python -m bank_sim teller`).

Each session is a teller at an outlet serving customers one after another:
QueryAccount, then Pay the arrears plus a deposit (续储: rounded up to the next
10 or 50 yuan) from the customer's passbook under a fresh bank serial, and now
and then a same-day Cancel (冲正) of that pay. Everything goes to the bridge.

The bank core never guesses (DESIGN.md semantic 3): a definite refusal gives
the money back to the passbook; an in-doubt answer (UNAVAILABLE,
DEADLINE_EXCEEDED, ABORTED, ...) is retried with the SAME serial and the same
parameters, with bounded back-off, until the answer is definite. A pay still
in doubt after the last attempt stays PENDING in the ledger, and the end of
the run sends it once more (the same serial again) before reporting.

Never logs a customer's name; the utility only sends it masked anyway."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from hdrh.histogram import HdrHistogram
from sqlalchemy.engine import Engine

from bank_sim import ledger
from bank_sim.settings import LinkSettings, TellerSettings
from yindian.v1 import billing_pb2, billing_pb2_grpc
from yindian_common.clock import Clock, make_clock
from yindian_common.db import make_engine
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.logs import setup_logging
from yindian_common.server import TlsFiles, open_channel
from yindian_common.settings import add_settings_flags, load_settings
from yindian_common.status import error_info

log = logging.getLogger("bank_sim.teller")

DESCRIPTION = "Teller sessions at the bank's counters: query, pay arrears plus a deposit, occasional same-day cancel."

# Retrying these with the same serial is safe and needed: the call may or may
# not have been applied (or, for RESOURCE_EXHAUSTED, nothing was written yet).
IN_DOUBT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
})
# ...except when the server says why and that nothing was written: the utility suspended the bank (停工).
DEFINITE_REASONS = frozenset({"BANK_SUSPENDED"})
DEPOSIT_STEPS_FEN = (1_000, 5_000)  # round up to the next 10 or 50 yuan
RESOLVE_BATCH_MAX = 1_000
OK = "OK"

T = TypeVar("T")


# ---- domain: what a customer pays ----

def amount_with_deposit_fen(total_due_fen: int, step_fen: int) -> int:
    """The arrears plus a deposit: the next multiple of `step_fen` strictly
    above what is due, so a customer who owes nothing deposits one step."""
    if step_fen <= 0 or total_due_fen < 0:
        raise ValueError(f"bad amount inputs {total_due_fen=} {step_fen=}")
    return (total_due_fen // step_fen + 1) * step_fen


def choose_amount_fen(total_due_fen: int, balance_fen: int, step_fen: int) -> int | None:
    """What the customer pays from the passbook: arrears plus deposit if the
    balance covers it, else just the arrears, else nothing (None)."""
    wanted = amount_with_deposit_fen(total_due_fen, step_fen)
    if balance_fen >= wanted:
        return wanted
    if 0 < total_due_fen <= balance_fen:
        return total_due_fen
    return None


@dataclass(frozen=True)
class Customer:
    index: int
    account_no: str
    step_fen: int
    cancels: bool


def plan_customers(account_nos: list[str], count: int, seed: int, cancel_ratio: float) -> list[Customer]:
    """`count` distinct customers (at most the roster), each with a deposit step and whether the pay is cancelled.
    Decided up front from the seed, so the day does not depend on thread scheduling."""
    rng = random.Random(seed)
    chosen = rng.sample(account_nos, min(count, len(account_nos)))
    return [Customer(i, a, rng.choice(DEPOSIT_STEPS_FEN), rng.random() < cancel_ratio)
            for i, a in enumerate(chosen)]


# ---- recording ----

class RequestStats:
    """Every attempt's RPC, outcome (OK or the status code) and latency; thread-safe."""

    def __init__(self, latency_max_ms: int) -> None:
        self._lock = threading.Lock()
        self._max_us = latency_max_ms * 1000
        self.counts: dict[tuple[str, str], int] = {}
        self.latency_us: dict[str, HdrHistogram] = {}

    def record(self, rpc: str, outcome: str, latency_s: float) -> None:
        us = min(max(1, int(latency_s * 1_000_000)), self._max_us)
        with self._lock:
            self.counts[(rpc, outcome)] = self.counts.get((rpc, outcome), 0) + 1
            hist = self.latency_us.get(rpc)
            if hist is None:
                hist = self.latency_us[rpc] = HdrHistogram(1, self._max_us, 3)
            hist.record_value(us)

    def latency_table(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {rpc: {"count": h.get_total_count(),
                          "p50_ms": h.get_value_at_percentile(50) / 1000,
                          "p90_ms": h.get_value_at_percentile(90) / 1000,
                          "p99_ms": h.get_value_at_percentile(99) / 1000}
                    for rpc, h in sorted(self.latency_us.items())}


@dataclass
class TellerSummary:
    bank_id: str
    serial_prefix: str
    customers: dict[str, int] = field(default_factory=dict)
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    ledger: dict[str, dict[str, int]] = field(default_factory=dict)
    paid_fen: int = 0
    cancelled_fen: int = 0
    net_posted_fen: int = 0
    pending_fen: int = 0
    cancels_in_doubt: int = 0
    passbooks_broken: int = 0
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- the gRPC edge ----

class InDoubt(Exception):
    """The last attempt's answer was not definite; the same serial must be sent again later."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self.code = code


class BillingLink:
    """BillingService calls with a deadline, the bank id metadata (plain-text
    mode), per-attempt stats, and retries of in-doubt answers."""

    def __init__(self, channel: grpc.Channel, link: LinkSettings, stats: RequestStats) -> None:
        self._stub = billing_pb2_grpc.BillingServiceStub(channel)
        self._link = link
        self._stats = stats
        self._metadata = ((BANK_ID_METADATA, link.bank_id),) if link.insecure else ()
        self._jitter = random.Random()
        self._jitter_lock = threading.Lock()

    def query(self, account_no: str) -> billing_pb2.QueryAccountResponse:
        req = billing_pb2.QueryAccountRequest(account_no=account_no)
        return self._call("QueryAccount", self._stub.QueryAccount, req)

    def pay(self, req: billing_pb2.PayRequest) -> billing_pb2.PayResponse:
        return self._call("Pay", self._stub.Pay, req)

    def cancel(self, req: billing_pb2.CancelRequest) -> billing_pb2.CancelResponse:
        return self._call("Cancel", self._stub.Cancel, req)

    def _call(self, rpc: str, method: Callable[..., T], req: Any) -> T:
        """Raises grpc.RpcError for a definite refusal, InDoubt when attempts run out."""
        last = grpc.StatusCode.UNKNOWN
        for attempt in range(self._link.retry_max_attempts):
            if attempt:
                time.sleep(self._backoff_s(attempt))  # pacing a retry, not synchronisation
            started = time.perf_counter()
            try:
                resp = method(req, timeout=self._link.rpc_deadline_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                self._stats.record(rpc, code.name, time.perf_counter() - started)
                if code not in IN_DOUBT_CODES or _reason(exc) in DEFINITE_REASONS:
                    raise
                last = code
                continue
            self._stats.record(rpc, OK, time.perf_counter() - started)
            return resp
        raise InDoubt(last)

    def _backoff_s(self, attempt: int) -> float:
        cap = min(self._link.retry_backoff_cap_s, self._link.retry_backoff_base_s * 2 ** (attempt - 1))
        with self._jitter_lock:
            return cap / 2 + self._jitter.uniform(0, cap / 2)


def _reason(exc: grpc.RpcError) -> str:
    info = error_info(exc)
    return info.reason if info is not None else ""


def link_channel(link: LinkSettings) -> grpc.Channel:
    tls = (TlsFiles(link.tls_cert, link.tls_key, link.tls_ca)
           if link.tls_cert and link.tls_key and link.tls_ca else None)
    return open_channel(link.target, tls=tls, insecure=link.insecure)


# ---- one customer at the counter ----

@dataclass
class Counter:
    """What every session shares: settings, the ledger, the link, the clock and the customers' outcomes."""

    settings: TellerSettings
    engine: Engine
    link: BillingLink
    clock: Clock
    serial_prefix: str
    outcomes: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def pay_serial(self, customer: Customer) -> str:
        return f"{self.serial_prefix}P{customer.index:07d}"

    def cancel_serial(self, customer: Customer) -> str:
        return f"{self.serial_prefix}C{customer.index:07d}"


def serve_customer(counter: Counter, customer: Customer, outlet: str, teller: str) -> str:
    """Serves one customer; returns the customer's outcome."""
    bank_id = counter.settings.bank_id
    try:
        account = counter.link.query(customer.account_no)
    except InDoubt:
        return "query_unavailable"
    except grpc.RpcError as exc:
        return f"query_{exc.code().name.lower()}"  # type: ignore[attr-defined]
    if account.closed:
        return "account_closed"
    with counter.engine.connect() as conn:
        balance = ledger.balance_fen(conn, bank_id, customer.account_no)
    amount = choose_amount_fen(account.total_due_fen, balance, customer.step_fen)
    if amount is None:
        return "insufficient_funds"
    serial = counter.pay_serial(customer)
    try:
        with counter.engine.begin() as conn:
            balance_after = ledger.debit_for_pay(conn, bank_id=bank_id, bank_serial=serial,
                                                 account_no=customer.account_no, amount_fen=amount,
                                                 channel="COUNTER", outlet_code=outlet, teller_id=teller,
                                                 now=counter.clock.now())
    except ledger.InsufficientFunds:  # another channel (auto-debit) took money since the balance was read
        return "insufficient_funds"
    req = billing_pb2.PayRequest(bank_serial=serial, account_no=customer.account_no, amount_fen=amount,
                                 outlet_code=outlet, teller_id=teller, channel=billing_pb2.CHANNEL_COUNTER,
                                 bank_balance_fen=balance_after)
    outcome = settle_pay(counter, req)
    if outcome != "paid" or not customer.cancels:
        return outcome
    return cancel_pay(counter, customer, serial, amount)


def settle_pay(counter: Counter, req: billing_pb2.PayRequest) -> str:
    """Sends a PENDING pay (again) and moves its ledger row to what the answer says."""
    bank_id = counter.settings.bank_id
    try:
        resp = counter.link.pay(req)
    except InDoubt as exc:
        log.warning("event=pay_in_doubt bank=%s serial=%s last=%s", bank_id, req.bank_serial, exc.code.name)
        return "pay_in_doubt"
    except grpc.RpcError as exc:
        code = exc.code().name  # type: ignore[attr-defined]
        if exc.code() == grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
            # Our serials are fresh per run: this means the same serial went out with other parameters,
            # a bug on our side; the money may be with the utility, so the row stays PENDING for a person.
            log.error("event=pay_serial_conflict bank=%s serial=%s", bank_id, req.bank_serial)
            return "pay_serial_conflict"
        with counter.engine.begin() as conn:
            ledger.mark_failed(conn, bank_id=bank_id, bank_serial=req.bank_serial, reason=code,
                               now=counter.clock.now())
        log.info("event=pay_refused bank=%s serial=%s code=%s", bank_id, req.bank_serial, code)
        return f"pay_{code.lower()}"
    if resp.amount_fen and resp.amount_fen != req.amount_fen:
        raise RuntimeError(f"utility answered {resp.amount_fen} fen for a pay of {req.amount_fen} fen")
    with counter.engine.begin() as conn:
        ledger.mark_posted(conn, bank_id=bank_id, bank_serial=req.bank_serial,
                           settlement_date=dt.date.fromisoformat(resp.settlement_date),
                           receipt_no=resp.receipt_no, payment_id=resp.payment_id, now=counter.clock.now())
    return "paid"


def cancel_pay(counter: Counter, customer: Customer, serial: str, amount_fen: int) -> str:
    cancel_serial = counter.cancel_serial(customer)
    with counter.engine.begin() as conn:
        ledger.request_cancel(conn, bank_id=counter.settings.bank_id, bank_serial=serial,
                              cancel_serial=cancel_serial, now=counter.clock.now())
    return settle_cancel(counter, serial, cancel_serial, amount_fen)


def settle_cancel(counter: Counter, serial: str, cancel_serial: str, amount_fen: int) -> str:
    """Sends a REQUESTED cancel (again) and records what the answer says."""
    bank_id = counter.settings.bank_id
    req = billing_pb2.CancelRequest(cancel_serial=cancel_serial, original_serial=serial, amount_fen=amount_fen,
                                    reason="teller error, same-day reversal")
    try:
        resp = counter.link.cancel(req)
    except InDoubt:
        return "paid_cancel_in_doubt"
    except grpc.RpcError as exc:
        code = exc.code().name  # type: ignore[attr-defined]
        with counter.engine.begin() as conn:
            ledger.mark_cancel_refused(conn, bank_id=bank_id, bank_serial=serial, reason=f"cancel {code}",
                                       now=counter.clock.now())
        return f"paid_cancel_{code.lower()}"
    if resp.outcome != billing_pb2.CANCEL_OUTCOME_REVERSED:
        # We hold a posted receipt for it: the utility not knowing it is a discrepancy for reconciliation.
        log.error("event=cancel_original_unknown bank=%s serial=%s", bank_id, serial)
        return "paid_cancel_original_not_found"
    with counter.engine.begin() as conn:
        ledger.mark_cancelled(conn, bank_id=bank_id, bank_serial=serial,
                              cancel_date=dt.date.fromisoformat(resp.settlement_date), now=counter.clock.now())
    return "cancelled"


def resolve_pending(counter: Counter) -> int:
    """Sends every PENDING pay and every unanswered cancel again, each with its own serial and
    parameters; returns how many stay in doubt."""
    bank_id = counter.settings.bank_id
    with counter.engine.connect() as conn:
        rows = ledger.pending_rows(conn, bank_id, RESOLVE_BATCH_MAX)
        cancels = ledger.pending_cancels(conn, bank_id, RESOLVE_BATCH_MAX)
    still = 0
    for row in rows:
        # Exactly the request first sent: a replay with other parameters would be ALREADY_EXISTS.
        req = billing_pb2.PayRequest(bank_serial=row.bank_serial, account_no=row.account_no,
                                     amount_fen=row.amount_fen, outlet_code=row.outlet_code,
                                     teller_id=row.teller_id, channel=billing_pb2.CHANNEL_COUNTER)
        if row.balance_after_fen is not None:
            req.bank_balance_fen = row.balance_after_fen
        outcome = settle_pay(counter, req)
        counter.count(f"resolved_{outcome}")
        still += outcome in ("pay_in_doubt", "pay_serial_conflict")
    for row in cancels:
        if row.cancel_serial is None:
            raise RuntimeError(f"cancel of {row.bank_serial} requested without a serial")
        outcome = settle_cancel(counter, row.bank_serial, row.cancel_serial, row.amount_fen)
        counter.count(f"resolved_{outcome}")
        still += outcome == "paid_cancel_in_doubt"
    return still


# ---- the day at the counters ----

def prepare_bank(engine: Engine, settings: TellerSettings, clock: Clock) -> tuple[list[str], list[tuple[str, str]]]:
    """Schema, passbooks from the roster, outlets and tellers; returns the roster and (outlet, teller) pairs."""
    ledger.create_schema(engine)
    accounts = ledger.read_roster(settings.roster)
    with engine.begin() as conn:
        opened = ledger.load_passbooks(conn, settings.bank_id, accounts, rng=random.Random(settings.seed),
                                       low_balance_ratio=settings.low_balance_ratio, now=clock.now())
        pairs = ledger.ensure_outlets(conn, settings.bank_id, settings.outlets, settings.tellers_per_outlet)
    log.info("event=passbooks_loaded bank=%s roster=%d opened=%d", settings.bank_id, len(accounts), opened)
    return accounts, pairs


def run_counters(settings: TellerSettings, engine: Engine, channel: grpc.Channel, clock: Clock) -> TellerSummary:
    """Runs `settings.sessions` teller sessions over the planned customers and summarises the run."""
    started = time.perf_counter()
    accounts, pairs = prepare_bank(engine, settings, clock)
    customers = plan_customers(accounts, settings.customers, settings.seed, settings.cancel_ratio)
    stats = RequestStats(settings.latency_max_ms)
    # A fresh prefix per run keeps serials unique per bank across runs: "B" + 8 hex + kind + 7 digits = 17 chars.
    counter = Counter(settings, engine, BillingLink(channel, settings, stats), clock, f"B{secrets.token_hex(4)}")
    next_customer = iter(customers)
    take_lock = threading.Lock()

    def session(outlet: str, teller: str) -> None:
        while True:
            with take_lock:
                customer = next(next_customer, None)
            if customer is None:
                return
            counter.count(serve_customer(counter, customer, outlet, teller))

    threads = [threading.Thread(target=session, args=pairs[i % len(pairs)], name=f"teller-{i}")
               for i in range(max(1, settings.sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    resolve_pending(counter)
    return summarise(counter, stats, time.perf_counter() - started)


def summarise(counter: Counter, stats: RequestStats, elapsed_s: float) -> TellerSummary:
    bank_id = counter.settings.bank_id
    with counter.engine.connect() as conn:
        totals = ledger.totals_by_status(conn, bank_id, counter.serial_prefix)
        broken = ledger.check_passbooks(conn, bank_id)
        cancels_in_doubt = len(ledger.pending_cancels(conn, bank_id, RESOLVE_BATCH_MAX))
    summary = TellerSummary(bank_id=bank_id, serial_prefix=counter.serial_prefix,
                            customers=dict(sorted(counter.outcomes.items())),
                            latency=stats.latency_table(), elapsed_s=round(elapsed_s, 3), passbooks_broken=broken)
    for (rpc, outcome), n in sorted(stats.counts.items()):
        summary.requests.setdefault(rpc, {})[outcome] = n
    summary.ledger = {s: {"count": t.count, "amount_fen": t.amount_fen} for s, t in sorted(totals.items())}
    fen = {s: t.amount_fen for s, t in totals.items()}
    summary.net_posted_fen = fen.get(ledger.POSTED, 0)
    summary.cancelled_fen = fen.get(ledger.CANCELLED, 0)
    summary.paid_fen = summary.net_posted_fen + summary.cancelled_fen
    summary.pending_fen = fen.get(ledger.PENDING, 0)
    summary.cancels_in_doubt = cancels_in_doubt
    return summary


# ---- showing it to a person ----

def yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100:,}.{abs(fen) % 100:02d}"


def render_summary(summary: TellerSummary) -> list[Any]:
    """rich tables: requests by RPC and outcome, latency, customers, ledger in yuan."""
    from rich.table import Table

    requests = Table(title="Requests (every attempt)")
    for col in ("RPC", "outcome", "count"):
        requests.add_column(col, justify="right" if col == "count" else "left")
    for rpc, by_outcome in summary.requests.items():
        for outcome, n in by_outcome.items():
            requests.add_row(rpc, outcome, f"{n:,}")
    latency = Table(title="Latency per attempt, ms")
    for col in ("RPC", "count", "p50", "p90", "p99"):
        latency.add_column(col, justify="left" if col == "RPC" else "right")
    for rpc, row in summary.latency.items():
        latency.add_row(rpc, f"{int(row['count']):,}", f"{row['p50_ms']:.2f}", f"{row['p90_ms']:.2f}",
                        f"{row['p99_ms']:.2f}")
    customers = Table(title="Customers served")
    customers.add_column("outcome")
    customers.add_column("customers", justify="right")
    for outcome, n in summary.customers.items():
        customers.add_row(outcome, f"{n:,}")
    money = Table(title=f"Bank ledger of this run ({summary.bank_id}, serials {summary.serial_prefix}*)")
    for col in ("status", "transactions", "yuan"):
        money.add_column(col, justify="left" if col == "status" else "right")
    for status, total in summary.ledger.items():
        money.add_row(status, f"{total['count']:,}", yuan(total["amount_fen"]))
    money.add_row("net posted (owed to the utility)", "", yuan(summary.net_posted_fen), style="bold")
    return [requests, latency, customers, money]


def print_summary(summary: TellerSummary) -> None:
    from rich.console import Console

    console = Console()
    for table in render_summary(summary):
        console.print(table)
    console.print(f"elapsed {summary.elapsed_s:.1f} s; passbooks out of balance: {summary.passbooks_broken}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim teller", description=DESCRIPTION)
    add_settings_flags(parser, TellerSettings)
    parser.add_argument("--log-level", default="INFO", help="log level")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, "bank_sim.teller")
    settings = load_settings(TellerSettings, args, args.config_file)
    if not settings.roster:
        parser.error("--roster is required (the bank's agreement roster CSV)")
    if settings.db.startswith("sqlite:///"):
        Path(settings.db.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db, pool_size=max(4, settings.sessions + 2))
    channel = link_channel(settings)
    try:
        summary = run_counters(settings, engine, channel, make_clock(settings.clock_start))
    finally:
        channel.close()
        engine.dispose()
    print_summary(summary)
    if settings.summary_json:
        with open(settings.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary.to_json(), f, indent=2)
    in_doubt = summary.ledger.get(ledger.PENDING, {}).get("count", 0)
    return 0 if in_doubt == 0 and summary.cancels_in_doubt == 0 and summary.passbooks_broken == 0 else 1
