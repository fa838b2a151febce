"""Issue 9 items 2 and 3, the bridge's side: what is in doubt and what is not.

- A lost COMMIT reply (mis_adapter answers UNAVAILABLE, reason COMMIT_IN_DOUBT)
  is in doubt: the pay is SUSPECT and resolved through GetPayment.
- A pay refused "for now" (RETRYABLE) that the bank core leaves alone is probed
  once `retryable_probe_after_s` has passed, and the reconciliation day gate
  counts it until then: a refusal that followed a commit (the old
  DB_UNAVAILABLE answer to a lost COMMIT reply) comes out POSTED.
- A request that provably never left the bridge (no connection to the
  utility at all) is RETRYABLE, not in doubt: no tombstone, no "pay again".

Real mis_adapter process behind a fault-injecting gRPC link (tests/bank_sim/faulty_link.py)."""
from __future__ import annotations

import socket
import time
from collections.abc import Callable

import grpc
import pytest

from bridge import journal as jn
from tests.bank_sim.faulty_link import Fault, FaultyLink
from tests.bridge.conftest import BankCore, Utility, new_serial
from yindian_common.clock import business_date
from yindian_common.status import error_info

pytestmark = pytest.mark.timeout(120)

WAIT_S = 30.0


def reason(err: grpc.RpcError) -> str:
    info = error_info(err)
    return info.reason if info is not None else ""


def pay_error(core: BankCore, serial: str, acct: str, amount_fen: int) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        core.pay(serial, acct, amount_fen)
    return info.value


def state(core: BankCore, serial: str) -> str | None:
    core.bridge.ctx.writer.flush(WAIT_S)
    row = core.bridge.ctx.journal.get(jn.PAY, serial)
    return row.state if row is not None else None


def resolve_pass(core: BankCore) -> None:
    core.bridge.resolver.run_pass()
    assert core.bridge.ctx.writer.flush(WAIT_S)


def fault_on(serial: str, fault: Fault) -> Callable[[str, str, int], Fault]:
    return lambda rpc, s, attempt: fault if (rpc == "Pay" and s == serial and attempt == 1) else Fault.PASS


def test_commit_in_doubt_is_in_doubt_and_resolves_to_the_posted_payment(
        utility: Utility, make_bridge: Callable[..., BankCore]) -> None:
    serial, acct = new_serial("CID"), next(utility.accounts)
    with FaultyLink(utility.address, fault_on(serial, Fault.COMMIT_IN_DOUBT)) as link:
        core = make_bridge(link.address)
        err = pay_error(core, serial, acct, 2_500)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and reason(err) == "PAY_IN_DOUBT"
        assert state(core, serial) == jn.SUSPECT
        assert utility.payment(serial) == {"state": "POSTED", "amount_fen": 2_500, "account_no": acct}
        resolve_pass(core)
        assert state(core, serial) == jn.POSTED
        resp = core.pay(serial, acct, 2_500)
        assert resp == utility.get_payment(serial).payment and resp.amount_fen == 2_500


def test_a_retryable_pay_left_alone_is_counted_by_the_day_gate_and_probed(
        utility: Utility, make_bridge: Callable[..., BankCore]) -> None:
    serial, acct = new_serial("FR"), next(utility.accounts)
    with FaultyLink(utility.address, fault_on(serial, Fault.FALSE_REFUSAL)) as link:
        core = make_bridge(link.address, retryable_probe_after_s=3_600)
        err = pay_error(core, serial, acct, 3_300)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and reason(err) == "DB_UNAVAILABLE"
        assert state(core, serial) == jn.RETRYABLE
        day = business_date(core.bridge.ctx.clock)
        assert core.bridge.ctx.in_doubt_count(day) == 1
        resolve_pass(core)  # within the bound: the bank core may still retry, nothing is probed
        assert state(core, serial) == jn.RETRYABLE
        core.bridge.ctx.expedite_retryable(day)  # what reconciling the day does first
        resolve_pass(core)
        assert state(core, serial) == jn.POSTED
        assert core.bridge.ctx.in_doubt_count(day) == 0
        assert core.pay(serial, acct, 3_300) == utility.get_payment(serial).payment


def test_a_retryable_pay_is_probed_once_the_bound_has_passed(
        utility: Utility, make_bridge: Callable[..., BankCore]) -> None:
    serial, acct = new_serial("FB"), next(utility.accounts)
    with FaultyLink(utility.address, fault_on(serial, Fault.FALSE_REFUSAL)) as link:
        core = make_bridge(link.address, retryable_probe_after_s=0.2)
        pay_error(core, serial, acct, 4_100)
        assert state(core, serial) == jn.RETRYABLE
        deadline = time.monotonic() + WAIT_S
        while state(core, serial) == jn.RETRYABLE:
            assert time.monotonic() < deadline, "the RETRYABLE pay was never probed"
            resolve_pass(core)
            time.sleep(0.05)
        assert state(core, serial) == jn.POSTED


def test_a_pay_that_never_reached_the_utility_is_retryable_not_in_doubt(
        utility: Utility, make_bridge: Callable[..., BankCore]) -> None:
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        core = make_bridge(f"127.0.0.1:{closed.getsockname()[1]}", retryable_probe_after_s=3_600)
        serial, acct = new_serial("NS"), next(utility.accounts)
        err = pay_error(core, serial, acct, 5_000)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and reason(err) == "UTILITY_UNREACHABLE"
        assert "retry the same serial" in (err.details() or "")
        assert state(core, serial) == jn.RETRYABLE
        resolve_pass(core)  # nothing to resolve: no probe, no tombstone
        assert state(core, serial) == jn.RETRYABLE
        err = pay_error(core, serial, acct, 5_000)  # the bank core's retry is sent again, never "pay again"
        assert reason(err) == "UTILITY_UNREACHABLE" and state(core, serial) == jn.RETRYABLE
        assert utility.payment(serial) is None
