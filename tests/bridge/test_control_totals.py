"""The bank's side of continuous reconciliation read from the journal
(bridge.control_totals.journal_view), on SQLite, PostgreSQL and MariaDB:
each journal state counts as the utility would hold it, or is in doubt."""
from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bridge import journal as jn
from bridge.control_totals import journal_view
from yindian.v1 import billing_pb2 as pb
from yindian_common.control_totals import ControlTotals, Entry

pytestmark = pytest.mark.timeout(60)

DAY = dt.date(2026, 11, 28)
AT = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)
CUTOFF = AT + dt.timedelta(minutes=5)
SETTLED_BEFORE = CUTOFF - dt.timedelta(seconds=5)



def _posted_body(serial: str, amount_fen: int, *, day: dt.date = DAY, at: dt.datetime = AT) -> bytes:
    resp = pb.PayResponse(bank_serial=serial, amount_fen=amount_fen, settlement_date=day.isoformat())
    resp.posted_at.FromDatetime(at)
    return resp.SerializeToString()


def _row(kind: str, serial: str, state: str, amount_fen: int = 1_000, *, bank: str = "ICBC", body: bytes | None = None,
         original: str = "", message: str = "", day: dt.date = DAY, at: dt.datetime = AT) -> dict[str, object]:
    return {"kind": kind, "serial": serial, "bank_id": bank, "account_no": "0100000017", "original_serial": original,
            "amount_fen": amount_fen, "outlet_code": "O1", "teller_id": "T1", "channel": 1, "bank_balance_fen": None,
            "reason": "", "caller": "", "state": state, "status_code": 0 if body else None, "body": body,
            "message": message, "reversal_serial": None, "attempts": 0, "next_attempt_ms": 0,
            "business_date": day, "created_at": at, "updated_at": at}


def _cancelled(serial: str, original: str, outcome: int, at: dt.datetime = AT) -> dict[str, object]:
    body = pb.CancelResponse(outcome=outcome, cancel_serial=serial, original_serial=original).SerializeToString()
    return _row(jn.CANCEL, serial, jn.CANCELLED, body=body, original=original, at=at)


def test_journal_states_count_as_the_utility_holds_them(engine: Engine) -> None:
    P, C = jn.PAY, jn.CANCEL
    rows = [
        _row(P, "STANDING", jn.POSTED, 1_000, body=_posted_body("STANDING", 1_000)),
        _row(P, "CANCELLED", jn.POSTED, 2_000, body=_posted_body("CANCELLED", 2_000)),
        _cancelled("C-1", "CANCELLED", pb.CANCEL_OUTCOME_REVERSED),
        _row(P, "CANCEL-IN-DOUBT", jn.POSTED, 3_000, body=_posted_body("CANCEL-IN-DOUBT", 3_000)),
        _row(C, "C-2", jn.SUSPECT, original="CANCEL-IN-DOUBT"),
        _row(P, "SUSPECT", jn.SUSPECT), _row(P, "PENDING", jn.PENDING), _row(P, "REVERSING", jn.REVERSING),
        _row(P, "RETRYABLE", jn.RETRYABLE),
        _row(P, "RESOLVED-REVERSED", jn.NOT_APPLIED, 400, message="resolved: reversed at the utility"),
        _row(P, "TOMBSTONED-LATE", jn.NOT_APPLIED, 500, message="tombstoned: CANCEL_OUTCOME_REVERSED"),
        _row(P, "REFUSED", jn.NOT_APPLIED, message="resolved: refused by a tombstone"),
        _row(P, "NEVER-POSTED", jn.NOT_APPLIED, message="tombstoned: CANCEL_OUTCOME_ORIGINAL_NOT_FOUND"),
        _row(P, "FAILED", jn.FAILED),
        _row(P, "TOMORROW", jn.POSTED, 6_000, body=_posted_body("TOMORROW", 6_000, day=DAY + dt.timedelta(days=1))),
        _row(P, "AFTER-CUTOFF", jn.POSTED, 7_000,
             body=_posted_body("AFTER-CUTOFF", 7_000, at=CUTOFF + dt.timedelta(seconds=1))),
        # Journaled yesterday after the utility's sign-off: it settles today.
        _row(P, "SIGNED-OFF", jn.POSTED, 800, body=_posted_body("SIGNED-OFF", 800), day=DAY - dt.timedelta(days=1)),
        _row(P, "OTHER-BANK", jn.POSTED, 9_000, bank="ABC", body=_posted_body("OTHER-BANK", 9_000)),
        _cancelled("C-3", "NO-SUCH-PAY", pb.CANCEL_OUTCOME_ORIGINAL_NOT_FOUND),
        # Reversed just now: the utility may not count it as reversed as of the cutoff yet, so neither side does.
        _row(P, "JUST-CANCELLED", jn.POSTED, 1_100, body=_posted_body("JUST-CANCELLED", 1_100)),
        _cancelled("C-4", "JUST-CANCELLED", pb.CANCEL_OUTCOME_REVERSED, at=SETTLED_BEFORE),
        _row(P, "JUST-RESOLVED", jn.NOT_APPLIED, 1_200, message="resolved: reversed at the utility",
             at=SETTLED_BEFORE + dt.timedelta(seconds=1)),
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(jn.requests), rows)

    view = journal_view(engine, "ICBC", DAY, CUTOFF, SETTLED_BEFORE)

    assert view.entries == {"STANDING": Entry(1_000, False), "CANCELLED": Entry(2_000, True),
                            "SIGNED-OFF": Entry(800, False)}
    # Pays the utility reversed without the journal ever seeing them posted: settlement date unknown, left out.
    assert view.in_doubt == sorted(["CANCEL-IN-DOUBT", "SUSPECT", "PENDING", "REVERSING", "RETRYABLE",
                                    "JUST-CANCELLED", "RESOLVED-REVERSED", "TOMBSTONED-LATE", "JUST-RESOLVED"])
    assert view.totals == ControlTotals(posted_count=2, posted_fen=1_800, reversed_count=1, reversed_fen=2_000)
