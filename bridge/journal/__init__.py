"""The bridge's own journal: one row per money-moving request (Pay keyed by
bank_serial, Cancel keyed by cancel_serial) with its parameters, its state
and the utility's answer once definite, plus an append-only audit of every
outcome. The row is written before the request crosses the link, so no
payment the bridge forwarded can be forgotten; an outcome is recorded after.

Cost (BASELINES.md): one INSERT (insert-or-ignore, prebuilt) per request on
the caller's thread, and outcomes recorded by one writer thread in group
commits (one UPDATE + one audit INSERT per outcome, many per transaction).
Recording an outcome after answering the bank core is safe: a row still
PENDING after a crash is in doubt and is resolved at the utility, never
guessed.

States of a row:
    PENDING      forwarded (or about to be), answer not yet recorded
    POSTED       Pay applied; `body` is the utility's PayResponse
    CANCELLED    Cancel acknowledged; `body` is the utility's CancelResponse
    FAILED       the utility answered a definite error; `body` is its google.rpc.Status
    RETRYABLE    the utility refused for now and wrote nothing (RESOURCE_EXHAUSTED,
                 UNAVAILABLE, ABORTED with ErrorInfo); a retry of the serial is sent again
    SUSPECT      outcome unknown: a Pay awaits GetPayment, a Cancel awaits resending
    REVERSING    a Pay the utility never posted: a tombstoning Cancel
                 (`reversal_serial`) is sent until acknowledged
    NOT_APPLIED  a Pay that is definitively not applied (reversed, refused, tombstoned)

One bridge process owns a journal: in-process claims (`Claims`) make sure one
thread at a time acts on a serial. This package must never call the utility.

Modules by job: `schema` (kinds, states, bounds, the two tables), `records`
(`Entry` and `Outcome`, sharing their fields), `repository` (`Journal`,
`create_schema`: migrated by bridge/migrations), `writer` (`Claims` and the
group-commit `JournalWriter`)."""
from __future__ import annotations

from bridge.journal import audit_chain  # noqa: F401  (registers bridge_audit_seals in the metadata)
from bridge.journal.records import Entry, Outcome, Recorded, outcome_for
from bridge.journal.repository import Journal, create_schema
from bridge.journal.schema import (
    CANCEL,
    CANCELLED,
    DEFINITE_STATES,
    FAILED,
    IN_DOUBT_STATES,
    MESSAGE_MAX,
    NOT_APPLIED,
    PAY,
    PENDING,
    POSTED,
    RETRYABLE,
    REVERSING,
    SUSPECT,
    audit,
    metadata,
    requests,
    utc,
)
from bridge.journal.writer import Claim, Claims, JournalWriter, NewRow, Recording

__all__ = ["CANCEL", "CANCELLED", "DEFINITE_STATES", "FAILED", "IN_DOUBT_STATES", "MESSAGE_MAX", "NOT_APPLIED", "PAY",
           "PENDING", "POSTED", "RETRYABLE", "REVERSING", "SUSPECT", "Claim", "Claims", "Entry", "Journal",
           "JournalWriter", "NewRow", "Outcome", "Recorded", "Recording", "audit", "create_schema", "metadata", "outcome_for",
           "requests", "utc"]
