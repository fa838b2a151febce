"""One serial space per bank across branch databases (issue 10): the two money
defects of the branch topology, reproduced on real databases through a real
(in-process) mis_adapter, with the interleaving forced by database events.

- Same serial, two payments: a bank serial used on accounts in two branch
  databases must be one payment; GetPayment answers it wherever it lives.
- Cancel overtaking its pay: a Cancel of an unknown serial racing a late Pay of
  that serial on another branch's account must end consistent: either the
  cancel reversed the payment, or it tombstoned the serial and the Pay was
  refused. Never ORIGINAL_NOT_FOUND with the payment POSTED somewhere."""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from mis_adapter.db.core import Payment
from tests.support.databases import fresh_database
from tests.support.mis_data import BillSpec, RunningAdapter, add_account, running_adapter
from yindian.v1 import billing_pb2 as pb

pytestmark = pytest.mark.timeout(120)

BILL = [BillSpec("202610", 10_000, dt.date(2026, 11, 25))]
AMOUNT_FEN = 10_100


@dataclass
class Branches:
    adapter: RunningAdapter
    engines: list[Engine]       # main (branch 01 and the rest), branch 02, branch 03
    accounts: list[str]         # one account in each


@contextmanager
def three_branch_databases(backend: str, tmp_path: Path, **overrides: object) -> Iterator[Branches]:
    with ExitStack() as stack:
        main = stack.enter_context(fresh_database(backend, tmp_path, "main", schema="mis"))
        b02 = stack.enter_context(fresh_database(backend, tmp_path, "b02", schema="mis"))
        b03 = stack.enter_context(fresh_database(backend, tmp_path, "b03", schema="mis"))
        a = stack.enter_context(running_adapter(main, branch_db=[f"02={b02}", f"03={b03}"], **overrides))
        engines = [a.ctx.router.engine_for_branch(code) for code in ("01", "02", "03")]
        accounts = [add_account(e, code, 1, BILL) for e, code in zip(engines, ("01", "02", "03"), strict=True)]
        yield Branches(a, engines, accounts)


def payment_rows(engines: list[Engine], serial: str) -> list[tuple[int, str, str | None]]:
    """(database index, state, account) of every payments row with that serial, in every database."""
    t = Payment.__table__
    out = []
    for i, e in enumerate(engines):
        with e.connect() as conn:
            out += [(i, r.state, r.account_no)
                    for r in conn.execute(sa.select(t.c.state, t.c.account_no).where(t.c.bank_serial == serial))]
    return out


def pay(a: RunningAdapter, serial: str, account: str, amount_fen: int = AMOUNT_FEN) -> pb.PayResponse:
    return a.stub.Pay(pb.PayRequest(bank_serial=serial, account_no=account, amount_fen=amount_fen,
                                    channel=pb.CHANNEL_COUNTER), metadata=a.md(), timeout=30)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_same_serial_on_two_branch_databases_is_one_payment(backend: str, tmp_path: Path) -> None:
    with three_branch_databases(backend, tmp_path) as b:
        a, (acct1, acct2, _acct3) = b.adapter, b.accounts
        first = pay(a, "DUP-1", acct2)
        with pytest.raises(grpc.RpcError) as exc:
            pay(a, "DUP-1", acct1)
        assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert payment_rows(b.engines, "DUP-1") == [(1, "POSTED", acct2)]
        # the replay with the same parameters answers the first payment
        assert pay(a, "DUP-1", acct2).payment_id == first.payment_id
        st = a.stub.GetPayment(pb.GetPaymentRequest(bank_serial="DUP-1"), metadata=a.md())
        assert st.state == pb.PAYMENT_STATE_POSTED and st.payment.account_no == acct2
        # another bank's serial space is its own
        other = a.stub.Pay(pb.PayRequest(bank_serial="DUP-1", account_no=acct1, amount_fen=AMOUNT_FEN,
                                         channel=pb.CHANNEL_COUNTER), metadata=a.md("ABC"))
        assert other.account_no == acct1
        # a cancel finds the payment in its branch, wherever it lives
        c = a.stub.Cancel(pb.CancelRequest(cancel_serial="C-DUP-1", original_serial="DUP-1", amount_fen=AMOUNT_FEN),
                          metadata=a.md())
        assert c.outcome == pb.CANCEL_OUTCOME_REVERSED
        assert sorted(payment_rows(b.engines, "DUP-1")) == [(0, "POSTED", acct1), (1, "REVERSED", acct2)]


class AfterFirstCommit:
    """Forces an interleaving: once the watched call has committed its first
    writing transaction (in any database), the next connection it takes
    first runs `between` to completion (from the same server thread, so the
    watched call is parked exactly between its two transactions)."""

    def __init__(self, engines: list[Engine], between: Any) -> None:
        self.engines = engines
        self.between = between
        self.lock = threading.Lock()
        self.armed = False
        self.thread: int | None = None
        self.fired = False
        self.result: Any = None

    def _executed(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            conn.info["wrote"] = True

    def _commit(self, conn: Any) -> None:
        wrote = conn.info.pop("wrote", False)
        with self.lock:
            if self.armed and wrote and self.thread is None:
                self.thread = threading.get_ident()

    def _checkout(self, *_args: Any) -> None:
        with self.lock:
            go = self.thread == threading.get_ident() and not self.fired
            if go:
                self.fired = True
        if go:
            self.result = self.between()

    def __enter__(self) -> AfterFirstCommit:
        for e in self.engines:
            event.listen(e, "after_cursor_execute", self._executed)
            event.listen(e, "commit", self._commit)
            # at the connection's checkout, before its BEGIN (SQLite: IMMEDIATE), so the call holds no lock
            event.listen(e, "checkout", self._checkout)
        self.armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        # Disarmed, not removed: server threads may be iterating the listeners (the engines die with the test).
        with self.lock:
            self.armed = False
            self.fired = True


def outcome_of(call: Any) -> Any:
    try:
        return call()
    except grpc.RpcError as exc:
        return exc.code()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_cancel_overtaking_its_pay_on_another_branch_stays_consistent(backend: str, tmp_path: Path) -> None:
    with three_branch_databases(backend, tmp_path) as b:
        a, acct2 = b.adapter, b.accounts[1]
        with AfterFirstCommit(b.engines, lambda: outcome_of(lambda: pay(a, "LATE-1", acct2))) as race:
            cancel = outcome_of(lambda: a.stub.Cancel(
                pb.CancelRequest(cancel_serial="C-LATE-1", original_serial="LATE-1", amount_fen=AMOUNT_FEN),
                metadata=a.md(), timeout=60))
        assert race.fired, "the late pay never ran between the cancel's transactions"
        late_pay = race.result
        state = a.stub.GetPayment(pb.GetPaymentRequest(bank_serial="LATE-1"), metadata=a.md()).state
        rows = payment_rows(b.engines, "LATE-1")
        posted = [r for r in rows if r[1] == "POSTED"]
        if isinstance(cancel, pb.CancelResponse) and cancel.outcome == pb.CANCEL_OUTCOME_REVERSED:
            # the pay won: the cancel found and reversed it
            assert isinstance(late_pay, pb.PayResponse)
            assert state == pb.PAYMENT_STATE_REVERSED and not posted
        else:
            # the cancel won: the serial is tombstoned and the late pay refused, nowhere posted
            assert isinstance(cancel, pb.CancelResponse), cancel
            assert cancel.outcome == pb.CANCEL_OUTCOME_ORIGINAL_NOT_FOUND
            assert late_pay == grpc.StatusCode.FAILED_PRECONDITION, late_pay
            assert state == pb.PAYMENT_STATE_REFUSED
            assert not posted, rows
        # whatever won, a retry of the late pay on any branch never posts it
        for acct in b.accounts:
            assert outcome_of(lambda acct=acct: pay(a, "LATE-1", acct)) in (
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS)
        assert not [r for r in payment_rows(b.engines, "LATE-1") if r[1] == "POSTED"]


def all_at_once(calls: list[Any]) -> list[Any]:
    """Runs the calls in threads released together; their outcomes in order."""
    results: list[Any] = [None] * len(calls)
    gate = threading.Barrier(len(calls))

    def run(i: int) -> None:
        gate.wait(30)
        results[i] = outcome_of(calls[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_racing_pays_replays_and_cancels_of_one_serial_across_branches(backend: str, tmp_path: Path) -> None:
    """Unforced races: rounds of the same serial paid at once on accounts of three
    branch databases (plus replays), with a cancel of it in the middle of some.
    Every round ends with at most one payment anywhere, consistent with what
    the callers were told."""
    rounds = 6
    with three_branch_databases(backend, tmp_path) as b:
        a = b.adapter
        for n in range(rounds):
            serial, with_cancel = f"RACE-{n}", n % 2 == 1
            calls = [lambda acct=acct, serial=serial: pay(a, serial, acct, 100)
                     for acct in b.accounts for _replay in range(2)]
            if with_cancel:
                calls.append(lambda serial=serial: a.stub.Cancel(pb.CancelRequest(
                    cancel_serial=f"C-{serial}", original_serial=serial, amount_fen=100), metadata=a.md(), timeout=30))
            results = all_at_once(calls)
            rows = payment_rows(b.engines, serial)
            posted = [r for r in rows if r[1] in ("POSTED", "REVERSED")]
            assert len(posted) <= 1, rows
            pays = [r for r in results[:6] if isinstance(r, pb.PayResponse)]
            assert {p.account_no for p in pays} <= {r[2] for r in posted}, (pays, rows)
            assert all(r in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
                             grpc.StatusCode.UNAVAILABLE) for r in results[:6] if not isinstance(r, pb.PayResponse)), results
            if with_cancel:
                c = results[-1]
                assert isinstance(c, pb.CancelResponse), c
                if c.outcome == pb.CANCEL_OUTCOME_REVERSED:
                    assert [r[1] for r in posted] == ["REVERSED"]
                else:
                    assert not posted and not pays, (rows, results)
            else:
                assert len(posted) == 1 and posted[0][1] == "POSTED" and pays
            st = a.stub.GetPayment(pb.GetPaymentRequest(bank_serial=serial), metadata=a.md()).state
            expected = {"POSTED": pb.PAYMENT_STATE_POSTED, "REVERSED": pb.PAYMENT_STATE_REVERSED}
            assert st == (expected[posted[0][1]] if posted else pb.PAYMENT_STATE_REFUSED)
