"""The link's other transactions through a bridge to a real mis_adapter
process: sign-on at start, echo with the round trip, agreements relayed and
journaled (refused malformed ones never cross), sign-off from the command
line and its effect on a counter pay, sign-on again."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
import pytest
import sqlalchemy as sa

from bridge.link_journal import ANSWERED, REQUESTED, SIGN_AGREEMENT, SIGN_ON
from bridge.link_relay import relay_of
from tests.bridge.conftest import BankCore, Utility, new_serial, pay_request
from tests.support.procs import REPO
from yindian.v1 import billing_pb2 as pb
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(120)
WAIT_S = 30.0


def _free_account(utility: Utility) -> str:
    """An open account with no agreement (the seed signs about 60 %)."""
    eng = make_engine(utility.mis_db, pool_size=1)
    try:
        with eng.connect() as conn:
            return str(conn.execute(sa.text(
                "SELECT account_no FROM customers WHERE status = 'OPEN' AND account_no NOT IN "
                "(SELECT account_no FROM agreements) ORDER BY account_no DESC")).scalars().first())
    finally:
        eng.dispose()


def test_sign_on_at_start_echo_agreements_and_sign_off(utility: Utility,
                                                      make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(utility.address, sign_on_at_start=True)
    journal = relay_of(core.bridge.ctx).journal
    deadline = time.monotonic() + WAIT_S
    while journal.lines_of(SIGN_ON, "") != [(REQUESTED, ""), (ANSWERED, "OK")]:
        assert time.monotonic() < deadline, "the bridge did not sign on at start"
        time.sleep(0.05)
    echo = core.stub.Echo(pb.EchoRequest(nonce="e-1"), timeout=10)
    assert (echo.nonce, echo.link.state, echo.link.suspended) == ("e-1", pb.LINK_STATE_SIGNED_ON, False)
    assert echo.link_round_trip_us > 0
    today = echo.link.settlement_date

    acct = _free_account(utility)
    serial = new_serial("AG")
    req = pb.SignAgreementRequest(agreement_serial=serial, account_no=acct, savings_account_ref="PB-1")
    first = core.stub.SignAgreement(req, timeout=10)
    assert (first.replayed, first.agreement.state) == (False, pb.AGREEMENT_STATE_ACTIVE)
    assert core.stub.SignAgreement(req, timeout=10).replayed
    assert journal.lines_of(SIGN_AGREEMENT, serial) == [(REQUESTED, ""), (ANSWERED, "OK")] * 2
    bad = pb.SignAgreementRequest(agreement_serial="bad serial", account_no=acct, savings_account_ref="PB-1")
    with pytest.raises(grpc.RpcError) as e:
        core.stub.SignAgreement(bad, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert journal.lines_of(SIGN_AGREEMENT, "bad serial") == []
    listed = core.stub.ListAgreements(pb.ListAgreementsRequest(account_no=acct), timeout=10)
    assert [a.agreement_serial for a in listed.agreements] == [serial]

    # Day end: the bank core signs off through its bridge; a counter pay then settles the next day.
    out = subprocess.run([sys.executable, "-m", "bridge", "sign-off", "--target", core.bridge.address, "--insecure"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "state=SIGNED_OFF" in out.stdout, out.stdout + out.stderr
    tomorrow = (dt.date.fromisoformat(today) + dt.timedelta(days=1)).isoformat()
    assert core.pay(new_serial("P"), acct, 1_000).settlement_date == tomorrow
    on = core.stub.SignOn(pb.SignOnRequest(), timeout=10).link
    assert (on.state, on.settlement_date) == (pb.LINK_STATE_SIGNED_ON, today)
    assert core.pay(new_serial("P"), acct, 1_000).settlement_date == today
    assert core.stub.Pay(pay_request(new_serial("P"), acct, 1_000), timeout=10).settlement_date == today
