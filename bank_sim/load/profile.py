"""What one load run does: the operations, their bounds, the profile and the target rule."""
from __future__ import annotations

from collections.abc import Iterable

import grpc
from pydantic import Field, field_validator, model_validator

from bank_sim.settings import LinkSettings
from yindian_common.server import is_loopback

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
