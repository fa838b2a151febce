"""Acceptance (issue 10): kill -9 of mis_adapter in the middle of the front
registry's protocol, with three branch databases. The process dies at a named
crash point (a test-only setting), exactly between the registry claim and the
branch commit, or after the branch commit before the reply. The bank retries
the same serial against a restarted mis_adapter: exactly one payment is
posted, in the account's branch, and the bill is paid once."""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter.db.core import BillRow, Payment
from mis_adapter.db.front import FrontSerial
from mis_adapter.migrate import upgrade
from tests.support.databases import fresh_database
from tests.support.mis_data import BillSpec, add_account, add_bank
from tests.support.procs import Proc, start
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

BANK = "ICBC"
CLOCK = "2026-11-28T12:00:00+08:00"
BILL = [BillSpec("202610", 10_000, dt.date(2026, 11, 25))]
AMOUNT_FEN = 10_100
CALL_TIMEOUT_S = 10.0


@contextmanager
def branch_databases(backend: str, tmp_path: Path) -> Iterator[tuple[list[str], list[Engine], list[str]]]:
    """Main (branch 01), branch 02 and branch 03 databases, migrated, one account with one bill in each."""
    with ExitStack() as stack:
        urls = [stack.enter_context(fresh_database(backend, tmp_path, label, schema="mis")) for label in ("main", "b02", "b03")]
        engines = [make_engine(u, pool_size=2) for u in urls]
        for e in engines:
            stack.callback(e.dispose)
            upgrade(e)
        add_bank(engines[0], BANK)
        accounts = [add_account(e, code, 1, BILL) for e, code in zip(engines, ("01", "02", "03"), strict=True)]
        yield urls, engines, accounts


def adapter(urls: list[str], tmp_path: Path, name: str, *extra: str) -> Proc:
    return start(name, ["mis_adapter", "serve", "--db", urls[0], "--branch-db", f"02={urls[1]}", "--branch-db",
                        f"03={urls[2]}", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--insecure",
                        "--clock-start", CLOCK, *extra], log_dir=tmp_path)


def pay(proc: Proc, serial: str, account: str) -> pb.PayResponse:
    with grpc.insecure_channel(proc.grpc_addr) as ch:
        return billing_pb2_grpc.BillingServiceStub(ch).Pay(
            pb.PayRequest(bank_serial=serial, account_no=account, amount_fen=AMOUNT_FEN, outlet_code="OUT01",
                          teller_id="T1", channel=pb.CHANNEL_COUNTER),
            metadata=[("x-yindian-bank-id", BANK)], timeout=CALL_TIMEOUT_S)


def posted(engines: list[Engine], serial: str) -> list[tuple[int, str, str | None]]:
    t = Payment.__table__
    out = []
    for i, e in enumerate(engines):
        with e.connect() as conn:
            out += [(i, r.state, r.account_no)
                    for r in conn.execute(sa.select(t.c.state, t.c.account_no).where(t.c.bank_serial == serial))]
    return out


def bill_paid_fen(engine: Engine) -> int:
    t = BillRow.__table__
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.sum(t.c.principal_paid_fen + t.c.late_fee_paid_fen))).scalar_one())


def claim_state(engine: Engine, serial: str) -> str | None:
    t = FrontSerial.__table__
    with engine.connect() as conn:
        return conn.execute(sa.select(t.c.state).where(t.c.serial == serial)).scalar_one_or_none()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("crash_point", ["mis.registry_after_claim", "mis.registry_after_branch_commit"])
def test_kill_9_inside_the_registry_protocol_the_retry_posts_exactly_once(
        backend: str, crash_point: str, tmp_path: Path) -> None:
    with branch_databases(backend, tmp_path) as (urls, engines, accounts):
        acct1, acct2, _acct3 = accounts
        doomed = adapter(urls, tmp_path, "mis_adapter-doomed", "--crash-point", crash_point)
        with pytest.raises(grpc.RpcError) as exc:
            pay(doomed, "KILL-1", acct2)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # the bank saw no answer: in doubt
        assert doomed.popen.wait(timeout=30) == -9
        assert any(f"event=crash_point name={crash_point}" in line for line in doomed.output)
        in_branch = posted(engines, "KILL-1")
        assert in_branch == ([] if crash_point == "mis.registry_after_claim" else [(1, "POSTED", acct2)])
        assert claim_state(engines[0], "KILL-1") == "CLAIMED"

        survivor = adapter(urls, tmp_path, "mis_adapter-2")
        try:
            # the claim outlived the process: the serial cannot land on another branch meanwhile
            with pytest.raises(grpc.RpcError) as other:
                pay(survivor, "KILL-1", acct1)
            assert other.value.code() == grpc.StatusCode.ALREADY_EXISTS
            # the bank's retry of the same serial: one payment, in the account's branch
            first = pay(survivor, "KILL-1", acct2)
            again = pay(survivor, "KILL-1", acct2)
            assert first.payment_id == again.payment_id and first.account_no == acct2
        finally:
            assert survivor.terminate() == 0
        assert posted(engines, "KILL-1") == [(1, "POSTED", acct2)]
        assert [bill_paid_fen(e) for e in engines] == [0, AMOUNT_FEN, 0]
        assert claim_state(engines[0], "KILL-1") == "SETTLED"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_restart_settles_a_claim_whose_branch_committed(backend: str, tmp_path: Path) -> None:
    """The recovery pass at start settles, by looking in the branch, a claim a killed process left open."""
    with branch_databases(backend, tmp_path) as (urls, engines, accounts):
        doomed = adapter(urls, tmp_path, "mis_adapter-doomed", "--crash-point", "mis.registry_after_branch_commit")
        with pytest.raises(grpc.RpcError):
            pay(doomed, "KILL-2", accounts[2])
        doomed.popen.wait(timeout=30)
        assert claim_state(engines[0], "KILL-2") == "CLAIMED"
        survivor = adapter(urls, tmp_path, "mis_adapter-2")
        try:
            assert claim_state(engines[0], "KILL-2") == "SETTLED"
            assert any("event=registry_recovered settled=1" in line for line in survivor.output)
        finally:
            assert survivor.terminate() == 0
        assert posted(engines, "KILL-2") == [(2, "POSTED", accounts[2])]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_claim_killed_before_its_branch_commit_is_released_once_expired(backend: str, tmp_path: Path) -> None:
    """Killed between the claim and the branch commit, and the bank never retries: the claim would hold the
    serial for ever. A restart past registry_claim_expiry_s finds nothing in the branch and releases it; the
    periodic pass settles a claim whose branch holds the serial without any restart."""
    with branch_databases(backend, tmp_path) as (urls, engines, accounts):
        _acct1, acct2, acct3 = accounts
        doomed = adapter(urls, tmp_path, "mis_adapter-doomed", "--crash-point", "mis.registry_after_claim")
        with pytest.raises(grpc.RpcError):
            pay(doomed, "KILL-3", acct2)
        assert doomed.popen.wait(timeout=30) == -9
        assert posted(engines, "KILL-3") == [] and claim_state(engines[0], "KILL-3") == "CLAIMED"
        later = (dt.datetime.fromisoformat(CLOCK) + dt.timedelta(hours=1)).isoformat()
        survivor = start("mis_adapter-2", ["mis_adapter", "serve", "--db", urls[0], "--branch-db", f"02={urls[1]}",
                                           "--branch-db", f"03={urls[2]}", "--listen", "127.0.0.1:0",
                                           "--metrics-port", "0", "--insecure", "--clock-start", later,
                                           "--registry-recover-interval-s", "0.2"], log_dir=tmp_path)
        try:
            assert claim_state(engines[0], "KILL-3") is None
            assert any("event=registry_recovered settled=0 released=1 open=0" in line for line in survivor.output)
            # nothing was written: the serial is free, and the bank's next use of it posts exactly once
            first = pay(survivor, "KILL-3", acct3)
            assert pay(survivor, "KILL-3", acct3).payment_id == first.payment_id
            # a claim left open with its payment committed (as a kill after the branch commit leaves it)
            # is settled by the periodic pass, no restart needed
            t = FrontSerial.__table__
            with engines[0].begin() as conn:
                conn.execute(t.update().where(t.c.serial == "KILL-3").values(state="CLAIMED", settled_at=None))
            for _ in range(200):
                if claim_state(engines[0], "KILL-3") == "SETTLED":
                    break
                threading.Event().wait(0.05)
            assert claim_state(engines[0], "KILL-3") == "SETTLED"
        finally:
            assert survivor.terminate() == 0
        assert posted(engines, "KILL-3") == [(2, "POSTED", acct3)]
        assert [bill_paid_fen(e) for e in engines] == [0, 0, AMOUNT_FEN]
