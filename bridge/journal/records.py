"""One journal row (`Entry`) and one state change of it (`Outcome`): the
fields they share are declared once, in `Recorded`."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from bridge.journal.schema import COLUMNS, DEFINITE_STATES, MESSAGE_MAX, utc


@dataclass(frozen=True, kw_only=True)
class Recorded:
    """What a journal row and a state change of it both carry: the request's
    key and amount, its state, and the utility's answer so far."""
    kind: str
    serial: str
    bank_id: str
    amount_fen: int
    state: str
    status_code: int | None = None
    body: bytes | None = None
    message: str = ""
    reversal_serial: str | None = None
    attempts: int = 0
    next_attempt_ms: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.serial)


# The answer-so-far fields an outcome carries over from its row unless changed.
ANSWER_FIELDS = ("status_code", "body", "message", "reversal_serial", "attempts", "next_attempt_ms")


@dataclass(frozen=True, kw_only=True)
class Entry(Recorded):
    """One journal row: the shared fields plus what the bank core sent and when."""
    business_date: dt.date
    created_at: dt.datetime
    updated_at: dt.datetime
    account_no: str = ""
    original_serial: str = ""
    outlet_code: str = ""
    teller_id: str = ""
    channel: int = 0
    bank_balance_fen: int | None = None
    reason: str = ""
    # Who sent it (not part of the request: a retry by another admitted client is the same request).
    caller: str = ""

    def same_request(self, other: Entry) -> bool:
        """Same parameters (the idempotency rule): only what the bank core sent counts."""
        return (self.kind == other.kind and self.serial == other.serial
                and self.account_no == other.account_no and self.original_serial == other.original_serial
                and self.amount_fen == other.amount_fen and self.outlet_code == other.outlet_code
                and self.teller_id == other.teller_id and self.channel == other.channel
                and self.bank_balance_fen == other.bank_balance_fen and self.reason == other.reason)

    def row(self) -> dict[str, Any]:
        out = {c: getattr(self, c) for c in COLUMNS}
        out["created_at"], out["updated_at"] = utc(self.created_at), utc(self.updated_at)
        return out


@dataclass(frozen=True, kw_only=True)
class Outcome(Recorded):
    """A state change of one row, and its audit line."""
    at: dt.datetime

    @property
    def definite(self) -> bool:
        return self.state in DEFINITE_STATES


def outcome_for(entry: Entry, state: str, at: dt.datetime, **changes: Any) -> Outcome:
    """The outcome of `entry` moving to `state`, keeping what is not changed."""
    base: dict[str, Any] = {name: getattr(entry, name) for name in ANSWER_FIELDS}
    base.update(changes)
    base["message"] = str(base["message"])[:MESSAGE_MAX]
    return Outcome(kind=entry.kind, serial=entry.serial, bank_id=entry.bank_id, amount_fen=entry.amount_fen,
                   state=state, at=at, **base)
