"""The bridge between a bank core (a gRPC client here) and a real mis_adapter
process, through a link the tests can break at an exact point of a call:
journaling before forwarding, replays from the journal, serial conflicts,
answers lost after the utility applied a pay (resolved to POSTED) and
requests lost before it (tombstoned, PAYMENT_NOT_APPLIED), duplicates in
flight, cancels in doubt, restarts with in-doubt rows, and malformed
requests that are neither journaled nor forwarded."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from bridge import journal as jn
from bridge.resolver import reversal_serial
from tests.bridge.conftest import BANK, BankCore, Utility, new_serial, pay_request
from tests.bridge.link import Link
from tests.support.procs import start
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.fields import make_account_no
from yindian_common.status import error_info

pytestmark = pytest.mark.timeout(120)

WAIT_S = 30.0


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Polls a condition with a bounded deadline."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def reason(err: grpc.RpcError) -> str:
    info = error_info(err)
    return info.reason if info is not None else ""


def journal_state(core: BankCore, kind: str, serial: str) -> str | None:
    core.bridge.ctx.writer.flush(WAIT_S)
    row = core.bridge.ctx.journal.get(kind, serial)
    return row.state if row is not None else None


def test_pay_is_journaled_before_it_crosses_the_link(utility: Utility, link: Link,
                                                     make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    serial, acct = new_serial("J"), next(utility.accounts)
    link.hold_next_request()
    result: list[pb.PayResponse] = []
    t = threading.Thread(target=lambda: result.append(core.pay(serial, acct, 1_000)))
    t.start()
    assert link.held.wait(WAIT_S)
    # The request is on the wire and the utility has not seen it: the journal already has it.
    row = core.bridge.ctx.journal.get(jn.PAY, serial)
    assert row is not None and row.state == jn.PENDING and row.amount_fen == 1_000 and row.account_no == acct
    assert utility.payment(serial) is None
    link.release()
    t.join(WAIT_S)
    assert result and result[0].bank_serial == serial
    assert journal_state(core, jn.PAY, serial) == jn.POSTED
    assert [a["state"] for a in core.bridge.ctx.journal.audit_lines(jn.PAY, serial)] == [jn.POSTED]


def test_replay_returns_the_same_receipt_and_other_parameters_are_refused(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    serial, acct = new_serial("R"), next(utility.accounts)
    first = core.pay(serial, acct, 2_345)
    forwarded = link.requests
    for _ in range(5):
        assert core.pay(serial, acct, 2_345) == first
    assert link.requests == forwarded, "replays are answered from the journal"
    err = rpc_error(lambda: core.pay(serial, acct, 2_346))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "bank_serial" in (err.details() or "")
    assert link.requests == forwarded
    assert utility.payment(serial) == {"state": "POSTED", "amount_fen": 2_345, "account_no": acct}
    assert utility.get_payment(serial).payment == first


def test_definite_error_is_relayed_unchanged_and_replayed_from_the_journal(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    direct = billing_pb2_grpc.BillingServiceStub(grpc.insecure_channel(utility.address))
    unknown = make_account_no("99", 1)  # a valid check digit on a branch that does not exist
    serial = new_serial("N")
    expected = rpc_error(lambda: direct.Pay(pay_request(new_serial("D"), unknown, 100), timeout=10,
                                            metadata=[("x-yindian-bank-id", BANK)]))
    err = rpc_error(lambda: core.pay(serial, unknown, 100))
    assert err.code() == expected.code() == grpc.StatusCode.NOT_FOUND
    assert reason(err) == reason(expected) != ""
    assert journal_state(core, jn.PAY, serial) == jn.FAILED
    forwarded = link.requests
    again = rpc_error(lambda: core.pay(serial, unknown, 100))
    assert (again.code(), again.details(), reason(again)) == (err.code(), err.details(), reason(err))
    assert link.requests == forwarded


def test_refusal_that_wrote_nothing_is_relayed_and_the_same_serial_goes_through_later(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    serial, acct = new_serial("SUS"), next(utility.accounts)
    utility.bank_admin("suspend")
    try:
        err = rpc_error(lambda: core.pay(serial, acct, 1_234))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and reason(err) == "BANK_SUSPENDED"
        assert journal_state(core, jn.PAY, serial) == jn.RETRYABLE
        assert utility.payment(serial) is None
    finally:
        utility.bank_admin("resume")
    resp = core.pay(serial, acct, 1_234)
    assert resp.amount_fen == 1_234 and journal_state(core, jn.PAY, serial) == jn.POSTED
    assert utility.payment(serial) == {"state": "POSTED", "amount_fen": 1_234, "account_no": acct}


def test_lost_answer_is_resolved_to_posted_with_the_utility_receipt(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    serial, acct = new_serial("LA"), next(utility.accounts)
    link.cut_after_response()
    err = rpc_error(lambda: core.pay(serial, acct, 3_000))
    assert link.fired.is_set()
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "retry the same serial" in (err.details() or "")
    assert journal_state(core, jn.PAY, serial) == jn.SUSPECT
    posted = utility.payment(serial)
    assert posted is not None and posted["state"] == "POSTED"
    resp = core.pay(serial, acct, 3_000)
    assert resp == utility.get_payment(serial).payment and resp.amount_fen == 3_000
    assert journal_state(core, jn.PAY, serial) == jn.POSTED
    assert core.pay(serial, acct, 3_000) == resp


def test_lost_request_is_tombstoned_and_reported_not_applied(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    serial, acct = new_serial("LR"), next(utility.accounts)
    link.cut_before_request()
    err = rpc_error(lambda: core.pay(serial, acct, 4_000))
    assert link.fired.is_set() and err.code() == grpc.StatusCode.UNAVAILABLE
    assert utility.payment(serial) is None
    for _ in range(2):
        err = rpc_error(lambda: core.pay(serial, acct, 4_000))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason(err) == "PAYMENT_NOT_APPLIED" and "PAYMENT_NOT_APPLIED" in (err.details() or "")
    assert utility.payment(serial) == {"state": "TOMBSTONE", "amount_fen": 4_000, "account_no": None}
    assert core.bridge.ctx.writer.flush(WAIT_S)  # the bank core is answered before the outcome is recorded
    row = core.bridge.ctx.journal.get(jn.PAY, serial)
    assert row is not None and row.state == jn.NOT_APPLIED and row.reversal_serial == reversal_serial(BANK, serial)


def test_upstream_deadline_is_the_callers_less_a_margin_and_a_late_request_still_settles(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address, upstream_deadline_margin_s=1.5)
    serial, acct = new_serial("DL"), next(utility.accounts)
    link.hold_next_request()
    # The bridge gives up upstream 1.5 s before the caller does, so the caller hears the bridge's answer.
    err = rpc_error(lambda: core.pay(serial, acct, 900, timeout_s=3.0))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and reason(err) == "PAY_IN_DOUBT"
    assert link.held.is_set()
    link.release()  # the held request reaches the utility late (or is cancelled there): either way...
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            resp = core.pay(serial, acct, 900)
            outcome = "POSTED"
            assert resp.amount_fen == 900
            break
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
                continue
            assert reason(exc) == "PAYMENT_NOT_APPLIED"
            outcome = "NOT_APPLIED"
            break
    else:
        raise AssertionError("no definite answer")
    # ...the bank core's definite answer matches the MIS.
    mis = utility.payment(serial)
    if outcome == "POSTED":
        assert mis is not None and mis["state"] == "POSTED"
    else:
        assert mis is None or mis["state"] in ("TOMBSTONE", "REVERSED")


def test_duplicate_of_an_in_flight_pay_is_aborted_then_answered(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address, duplicate_wait_s=0.2)
    serial, acct = new_serial("DUP"), next(utility.accounts)
    link.hold_next_request()
    result: list[pb.PayResponse] = []
    t = threading.Thread(target=lambda: result.append(core.pay(serial, acct, 1_500)))
    t.start()
    assert link.held.wait(WAIT_S)
    err = rpc_error(lambda: core.pay(serial, acct, 1_500))
    assert err.code() == grpc.StatusCode.ABORTED
    link.release()
    t.join(WAIT_S)
    assert result and core.pay(serial, acct, 1_500) == result[0]
    assert link.requests == 1


def test_a_burst_of_the_same_serial_applies_once_and_every_answer_agrees(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    serial, acct = new_serial("BURST"), next(utility.accounts)
    start_all = threading.Barrier(20)
    answers: list[object] = []
    lock = threading.Lock()

    def send() -> None:
        start_all.wait(WAIT_S)
        try:
            got: object = core.pay(serial, acct, 2_000)
        except grpc.RpcError as exc:
            got = exc.code()
        with lock:
            answers.append(got)

    threads = [threading.Thread(target=send) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    receipts = [a for a in answers if isinstance(a, pb.PayResponse)]
    assert len(answers) == 20 and receipts
    assert all(a == receipts[0] for a in receipts)
    assert all(a == grpc.StatusCode.ABORTED for a in answers if not isinstance(a, pb.PayResponse))
    assert link.requests == 1, "forwarded once"
    assert utility.payment(serial) == {"state": "POSTED", "amount_fen": 2_000, "account_no": acct}


def test_cancel_in_doubt_is_resent_and_a_reversed_pay_is_refused(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    serial, acct = new_serial("CP"), next(utility.accounts)
    core.pay(serial, acct, 5_000)
    cancel = pb.CancelRequest(cancel_serial=new_serial("CC"), original_serial=serial, amount_fen=5_000,
                              reason="customer asked")
    link.cut_after_response()
    err = rpc_error(lambda: core.stub.Cancel(cancel, timeout=10))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "retry the same serial" in (err.details() or "")
    assert utility.payment(serial)["state"] == "REVERSED"  # type: ignore[index]
    resp = core.stub.Cancel(cancel, timeout=10)
    assert resp.outcome == pb.CANCEL_OUTCOME_REVERSED
    assert core.stub.Cancel(cancel, timeout=10) == resp
    assert journal_state(core, jn.CANCEL, cancel.cancel_serial) == jn.CANCELLED
    err = rpc_error(lambda: core.pay(serial, acct, 5_000))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(err) == "SERIAL_REVERSED"


def test_restarted_bridge_resolves_in_doubt_rows_from_its_journal(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore], tmp_path: Path) -> None:
    journal_db = f"sqlite:///{tmp_path / 'restart.db'}"
    core = make_bridge(link.address, db=journal_db)
    posted, lost, cancelled = new_serial("RP"), new_serial("RL"), new_serial("RC")
    acct = next(utility.accounts)
    link.cut_after_response()
    rpc_error(lambda: core.pay(posted, acct, 1_100))
    link.cut_before_request()
    rpc_error(lambda: core.pay(lost, acct, 1_200))
    core.pay(cancelled, acct, 1_300)
    cancel = pb.CancelRequest(cancel_serial=new_serial("RX"), original_serial=cancelled, amount_fen=1_300)
    link.cut_before_request()
    rpc_error(lambda: core.stub.Cancel(cancel, timeout=10))
    core.bridge.stop()
    assert core.bridge.ctx.journal.counts_by_state().get(jn.SUSPECT) == 3

    # A new bridge process on the same journal, straight to the utility, resolves them in the background.
    proc = start("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", utility.address,
                            "--db", journal_db, "--bank-id", BANK, "--metrics-port", "0", "--insecure",
                            "--resolver-idle-wait-s", "0.1"], log_dir=tmp_path)
    try:
        wait_until(lambda: not set(core.bridge.ctx.journal.counts_by_state()) & jn.IN_DOUBT_STATES,
                   "the restarted bridge to resolve its in-doubt rows")
        j = core.bridge.ctx.journal
        assert [j.get(jn.PAY, posted).state, j.get(jn.PAY, lost).state,  # type: ignore[union-attr]
                j.get(jn.CANCEL, cancel.cancel_serial).state] == [jn.POSTED, jn.NOT_APPLIED, jn.CANCELLED]  # type: ignore[union-attr]
        assert [utility.payment(s)["state"] for s in (posted, lost, cancelled)] == [  # type: ignore[index]
            "POSTED", "TOMBSTONE", "REVERSED"]
        stub = billing_pb2_grpc.BillingServiceStub(grpc.insecure_channel(proc.grpc_addr))
        assert stub.Pay(pay_request(posted, acct, 1_100), timeout=10).amount_fen == 1_100
        err = rpc_error(lambda: stub.Pay(pay_request(lost, acct, 1_200), timeout=10))
        assert reason(err) == "PAYMENT_NOT_APPLIED"
    finally:
        assert proc.terminate() == 0


INVALID_PAYS = [
    ("bank_serial", {"bank_serial": "bad serial!"}),
    ("bank_serial", {"bank_serial": "x" * 33}),
    ("bank_serial", {"bank_serial": ""}),
    ("account_no", {"account_no": "0100000001"}),
    ("account_no", {"account_no": "01000000"}),
    ("amount_fen", {"amount_fen": 0}),
    ("amount_fen", {"amount_fen": 1_000_000_001}),
    ("outlet_code", {"outlet_code": "O" * 17}),
    ("teller_id", {"teller_id": "t\u00e9"}),
    ("channel", {"channel": pb.CHANNEL_UNSPECIFIED}),
    ("channel", {"channel": 99}),
    ("bank_balance_fen", {"bank_balance_fen": -1}),
]


def test_malformed_requests_name_the_field_and_are_neither_journaled_nor_forwarded(
        utility: Utility, link: Link, make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    acct = next(utility.accounts)
    calls: list[tuple[str, Callable[[], object]]] = []
    for field, change in INVALID_PAYS:
        req = pay_request(new_serial("V"), acct, 100)
        for k, v in change.items():
            setattr(req, k, v)
        calls.append((field, lambda r=req: core.stub.Pay(r, timeout=10)))
    cancels = [("cancel_serial", {"cancel_serial": "BRV-mine"}), ("original_serial", {"original_serial": "a b"}),
               ("amount_fen", {"amount_fen": -5}), ("reason", {"reason": "r" * 129})]
    for field, change in cancels:
        creq = pb.CancelRequest(cancel_serial=new_serial("VC"), original_serial="X1", amount_fen=100)
        for k, v in change.items():
            setattr(creq, k, v)
        calls.append((field, lambda r=creq: core.stub.Cancel(r, timeout=10)))
    calls.append(("account_no", lambda: core.stub.QueryAccount(pb.QueryAccountRequest(account_no="12"), timeout=10)))
    calls.append(("bank_serial", lambda: core.stub.GetPayment(pb.GetPaymentRequest(bank_serial="?"), timeout=10)))
    for field, call in calls:
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        info = error_info(err)
        assert info is not None and info.metadata["field"] == field and field in (err.details() or "")
    assert core.bridge.ctx.journal.counts_by_state() == {}
    assert link.requests == 0


def test_queries_are_forwarded_with_the_bank_identity(utility: Utility, link: Link,
                                                     make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address)
    serial, acct = new_serial("Q"), next(utility.accounts)
    before = core.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), timeout=10)
    assert before.account_no == acct
    paid = core.pay(serial, acct, 700)
    got = core.stub.GetPayment(pb.GetPaymentRequest(bank_serial=serial), timeout=10)
    assert got.state == pb.PAYMENT_STATE_POSTED and got.payment.receipt_no == paid.receipt_no
    after = core.stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), timeout=10)
    assert after.total_due_fen - after.prepaid_fen == before.total_due_fen - before.prepaid_fen - 700
    assert core.bridge.ctx.in_doubt_count(core.bridge.ctx.journal.get(jn.PAY, serial).business_date) == 0  # type: ignore[union-attr]
