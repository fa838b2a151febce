"""What the telephone channels know of a household, as plain values: the
account overview a caller hears, a dunning candidate, a recorded attempt.
Pure: no gRPC, no protobuf (ivr.customer_client converts at the edge)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

__all__ = ["OUTCOMES", "Attempt", "Candidate", "LastPayment", "Overview"]

# Dunning attempt outcomes, as the MIS records them.
OUTCOMES = ("PLACED", "ANSWERED", "NO_ANSWER", "BUSY", "FAILED", "SKIPPED_PAID", "SKIPPED_OPT_OUT")


@dataclass(frozen=True)
class LastPayment:
    date: dt.date
    amount_fen: int
    channel: str


@dataclass(frozen=True)
class Overview:
    account_no: str
    arrears_fen: int
    late_fee_fen: int
    total_due_fen: int
    prepaid_fen: int
    earliest_unpaid_due_date: dt.date | None
    last_payment: LastPayment | None
    closed: bool


@dataclass(frozen=True)
class Candidate:
    account_no: str
    phone: str = field(repr=False)  # never in a log line
    arrears_fen: int
    late_fee_fen: int
    total_due_fen: int
    oldest_due_date: dt.date
    days_overdue: int
    opted_out: bool


@dataclass(frozen=True)
class Attempt:
    campaign_id: str
    account_no: str
    attempt_no: int
    outcome: str
    placed_at: dt.datetime
    outcome_at: dt.datetime
