"""The resolver's idle check (one prebuilt probe before the two `Journal.due` selections) says
"something is due" exactly when `Journal.due` would return a row, for random journals of every
kind, state and due time, on SQLite, PostgreSQL and MariaDB: an idle pass skips nothing due."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import journal as jn
from bridge.journal import Claims, Journal
from bridge.journal.repository import create_schema
from bridge.journal.schema import requests
from bridge.resolver import Backoff, Resolver
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine

NOW_MS = 1_800_000_000_000
STATES = [jn.PENDING, jn.POSTED, jn.CANCELLED, jn.FAILED, jn.RETRYABLE, jn.SUSPECT, jn.REVERSING, jn.NOT_APPLIED]
ROWS = st.lists(st.tuples(st.sampled_from([jn.PAY, jn.CANCEL]), st.sampled_from(STATES),
                          st.sampled_from([0, NOW_MS - 1, NOW_MS, NOW_MS + 1, NOW_MS + 60_000])), max_size=8)


@pytest.fixture
def journal(db_url: str) -> Iterator[Journal]:
    engine = make_engine(db_url, pool_size=2)
    create_schema(engine)
    yield Journal(engine)
    engine.dispose()


def _resolver(journal: Journal) -> Resolver:
    clock = ManualClock(dt.datetime(2027, 1, 15, 8, 0, tzinfo=dt.UTC))
    return Resolver(journal=journal, writer=None, claims=Claims(), upstream=None, clock=clock,  # type: ignore[arg-type]
                    bank_id="ICBC", backoff=Backoff(1.0, 60.0), batch_max=100, idle_wait_s=1.0, call_timeout_s=5.0,
                    min_call_s=0.1)


def _row(i: int, kind: str, state: str, due_ms: int) -> dict[str, object]:
    at = dt.datetime(2027, 1, 15, 8, 0, tzinfo=dt.UTC)
    return {"kind": kind, "serial": f"S{i}", "bank_id": "ICBC", "account_no": "0100000001", "original_serial": "",
            "amount_fen": 100, "outlet_code": "O1", "teller_id": "T1", "channel": 1, "bank_balance_fen": None,
            "reason": "", "caller": "ICBC", "state": state, "status_code": None, "body": None, "message": "",
            "reversal_serial": None, "attempts": 0, "next_attempt_ms": due_ms, "business_date": at.date(),
            "created_at": at, "updated_at": at}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS)
def test_idle_check_agrees_with_journal_due(journal: Journal, rows: list[tuple[str, str, int]]) -> None:
    with journal.engine.begin() as conn:
        conn.execute(requests.delete())
        if rows:
            conn.execute(requests.insert(), [_row(i, *r) for i, r in enumerate(rows)])
    resolver = _resolver(journal)
    for at_ms in (NOW_MS - 1, NOW_MS, NOW_MS + 60_000):
        assert resolver.any_due(at_ms) == bool(journal.due(at_ms, 100)), (at_ms, rows)


def test_an_idle_pass_still_finds_a_suspect_cancel(journal: Journal) -> None:
    """The reversal the bank core is waiting for is not skipped by the idle check."""
    with journal.engine.begin() as conn:
        conn.execute(requests.insert(), [_row(1, jn.PAY, jn.POSTED, 0), _row(2, jn.CANCEL, jn.SUSPECT, NOW_MS)])
    resolver = _resolver(journal)
    assert not resolver.any_due(NOW_MS - 1)
    assert resolver.any_due(NOW_MS)
