"""Each money path crashed (SIGKILL) at each of its named crash points
(yindian_common.crash_points, armed with YINDIAN_CRASH_POINT in one process
only), then recovered: real mis_adapter and bridge processes on a seeded
SQLite MIS. After the restart the bank core resends the same serial until
the answer is definite, and the invariants hold: an accepted pay is POSTED
exactly once with its amount and the account's books moved by exactly that;
a pay that never committed is answered "not applied" (pay again) and is not
POSTED; a cancel resent after a crash reverses its pay once; a
reconciliation crashed mid-apply, sent again, closes the day once."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from tests.support.databases import migrated_sqlite
from tests.support.procs import REPO, Proc, start
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine
from yindian_common.ports import stable_port
from yindian_common.status import error_info

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

BANK = "ICBC"
ACCOUNTS = 60
CALL_TIMEOUT_S = 5.0
RESEND_WAIT_S = 60.0
IN_DOUBT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
            grpc.StatusCode.RESOURCE_EXHAUSTED}


def free_port(exclude: Collection[int] = ()) -> int:
    """Outside the ephemeral range: a restart after a kill finds it free (yindian_common.ports)."""
    return stable_port(exclude=exclude)


@dataclass
class Utility:
    mis_db: str
    accounts: list[str]


@pytest.fixture(scope="module")
def utility(tmp_path_factory: pytest.TempPathFactory) -> Utility:
    work = tmp_path_factory.mktemp("crash")
    mis_db = migrated_sqlite(work / "mis.db")
    subprocess.run([sys.executable, "-m", "mis_adapter", "seed", "--db", mis_db, "--accounts", str(ACCOUNTS),
                    "--roster-dir", str(work / "rosters")], cwd=REPO, check=True, timeout=180, capture_output=True)
    eng = make_engine(mis_db, pool_size=1)
    with eng.connect() as conn:
        accounts = [r[0] for r in conn.execute(sa.text(
            "SELECT account_no FROM customers WHERE status = 'OPEN' ORDER BY account_no"))]
    eng.dispose()
    return Utility(mis_db, accounts)


class Stack:
    """mis_adapter and the bridge as real processes, either armed at one crash point."""

    def __init__(self, utility: Utility, work: Path, crash_point: str) -> None:
        self.u, self.work, self.crash_point = utility, work, crash_point
        self.mis_port = free_port()
        self.bridge_port = free_port(exclude={self.mis_port})  # neither is bound yet: the bind check cannot tell
        self.bridge_db = f"sqlite:///{work / 'bridge.db'}"
        self.mis: Proc | None = None
        self.bridge: Proc | None = None
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.bridge_port}")
        self.stub = billing_pb2_grpc.BillingServiceStub(self.channel)

    def env(self, owner: str) -> dict[str, str]:
        return {"YINDIAN_CRASH_POINT": self.crash_point} if self.crash_point.startswith(owner) else {}

    def start_mis(self, armed: bool = True) -> None:
        self.mis = start("mis_adapter", ["mis_adapter", "serve", "--db", self.u.mis_db, "--listen",
                                         f"127.0.0.1:{self.mis_port}", "--metrics-port", "0", "--insecure",
                                         "--no-migrate"],
                         env=self.env("mis.") if armed else {}, log_dir=self.work)

    def start_bridge(self, armed: bool = True) -> None:
        self.bridge = start("bridge", ["bridge", "serve", "--listen", f"127.0.0.1:{self.bridge_port}", "--upstream",
                                       f"127.0.0.1:{self.mis_port}", "--db", self.bridge_db, "--bank-id", BANK,
                                       "--metrics-port", "0", "--insecure", "--resolver-backoff-initial-s", "0.05",
                                       "--resolver-backoff-cap-s", "0.5", "--resolver-idle-wait-s", "0.1"],
                            env=self.env("bridge.") if armed else {}, log_dir=self.work)

    def crashed(self) -> None:
        """The armed process died by SIGKILL at its point; start it again, unarmed."""
        owner = "mis" if self.crash_point.startswith("mis.") else "bridge"
        proc = self.mis if owner == "mis" else self.bridge
        assert proc is not None
        assert proc.popen.wait(timeout=30) == -9, f"{owner} did not crash at {self.crash_point}"
        (self.start_mis if owner == "mis" else self.start_bridge)(armed=False)

    def close(self) -> None:
        self.channel.close()
        for p in (self.bridge, self.mis):
            if p is not None and p.popen.poll() is None:
                p.terminate()


@pytest.fixture
def make_stack(utility: Utility, tmp_path: Path) -> Iterator[Callable[[str], Stack]]:
    made: list[Stack] = []

    def make(point: str) -> Stack:
        s = Stack(utility, tmp_path, point)
        s.start_mis()
        s.start_bridge()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def books_fen(mis_db: str, account: str) -> int:
    """What the account has been paid: principal and late fees on its bills plus its prepaid credit."""
    eng = make_engine(mis_db, pool_size=1)
    try:
        with eng.connect() as conn:
            paid = conn.execute(sa.text("SELECT COALESCE(SUM(principal_paid_fen + late_fee_paid_fen), 0) FROM bills "
                                        "WHERE account_no = :a"), {"a": account}).scalar_one()
            prepaid = conn.execute(sa.text("SELECT prepaid_fen FROM customers WHERE account_no = :a"),
                                   {"a": account}).scalar_one()
    finally:
        eng.dispose()
    return int(paid) + int(prepaid)


def mis_rows(mis_db: str, serial: str) -> list[tuple[str, int]]:
    eng = make_engine(mis_db, pool_size=1)
    try:
        with eng.connect() as conn:
            return [(r.state, r.amount_fen) for r in conn.execute(sa.text(
                "SELECT state, amount_fen FROM payments WHERE bank_id = :b AND bank_serial = :s"),
                {"b": BANK, "s": serial})]
    finally:
        eng.dispose()


def until_definite(call: Callable[[], object]) -> tuple[object | None, grpc.RpcError | None]:
    """The bank core's resend of the same request until the answer is definite."""
    t_end = time.monotonic() + RESEND_WAIT_S
    pause = 0.05
    while True:
        try:
            return call(), None
        except grpc.RpcError as exc:
            if exc.code() not in IN_DOUBT or time.monotonic() > t_end:  # type: ignore[attr-defined]
                return None, exc
        time.sleep(pause)  # the bank core's back-off between resends
        pause = min(pause * 2, 1.0)


def pay(stack: Stack, serial: str, account: str, amount_fen: int) -> Callable[[], object]:
    req = pb.PayRequest(bank_serial=serial, account_no=account, amount_fen=amount_fen, outlet_code="O1",
                        teller_id="T1", channel=pb.CHANNEL_COUNTER)
    return lambda: stack.stub.Pay(req, timeout=CALL_TIMEOUT_S)


# (crash point, True if the pay had committed in the MIS when the process died)
PAY_POINTS = [("bridge.after_journal", False), ("bridge.after_answer", True), ("bridge.after_reply", True),
              ("mis.before_commit", False), ("mis.after_commit", True)]


@pytest.mark.parametrize(("point", "committed"), PAY_POINTS, ids=[p for p, _ in PAY_POINTS])
def test_pay_crashed_at_each_point_recovers_exactly_once(make_stack: Callable[[str], Stack], utility: Utility,
                                                         point: str, committed: bool) -> None:
    stack = make_stack(point)
    account = utility.accounts[PAY_POINTS.index((point, committed)) + 1]
    serial, amount = f"CP-{uuid.uuid4().hex[:10]}", 12_345
    before = books_fen(utility.mis_db, account)
    first, err = until_definite(pay(stack, serial, account, amount)) if point == "bridge.after_reply" else (None, None)
    if point == "bridge.after_reply":
        assert err is None, err  # the bank core got its receipt, then the bridge died
    else:
        with pytest.raises(grpc.RpcError) as exc:
            pay(stack, serial, account, amount)()
        assert exc.value.code() in IN_DOUBT  # the connection died under the call
    stack.crashed()
    answer, err = until_definite(pay(stack, serial, account, amount))
    rows = mis_rows(utility.mis_db, serial)
    if committed:
        assert err is None, f"{point}: the committed pay was not answered with its receipt: {err}"
        assert rows == [("POSTED", amount)]
        assert books_fen(utility.mis_db, account) - before == amount
        if first is not None:
            assert answer.payment_id == first.payment_id  # type: ignore[attr-defined]
    else:
        assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        info = error_info(err)
        assert info is not None and info.reason == "PAYMENT_NOT_APPLIED"
        assert all(state != "POSTED" for state, _ in rows), rows
        assert books_fen(utility.mis_db, account) == before


@pytest.mark.parametrize("point", ["bridge.after_journal", "bridge.after_answer"])
def test_cancel_crashed_and_resent_reverses_once(make_stack: Callable[[str], Stack], utility: Utility,
                                                 point: str) -> None:
    stack = make_stack("")  # nothing armed for the pay
    account = utility.accounts[10 + (point == "bridge.after_answer")]
    serial, amount = f"CP-{uuid.uuid4().hex[:10]}", 5_000
    before = books_fen(utility.mis_db, account)
    _, err = until_definite(pay(stack, serial, account, amount))
    assert err is None, err
    assert stack.bridge is not None
    assert stack.bridge.terminate() == 0
    stack.crash_point = point  # the bridge, armed, takes the cancel
    stack.start_bridge()
    cancel = pb.CancelRequest(cancel_serial=f"CC-{uuid.uuid4().hex[:10]}", original_serial=serial,
                              amount_fen=amount, reason="crash test")
    with pytest.raises(grpc.RpcError) as exc:
        stack.stub.Cancel(cancel, timeout=CALL_TIMEOUT_S)
    assert exc.value.code() in IN_DOUBT
    stack.crashed()
    answer, err = until_definite(lambda: stack.stub.Cancel(cancel, timeout=CALL_TIMEOUT_S))
    assert err is None, err
    assert answer.outcome == pb.CANCEL_OUTCOME_REVERSED  # type: ignore[attr-defined]
    assert mis_rows(utility.mis_db, serial) == [("REVERSED", amount)]
    assert books_fen(utility.mis_db, account) == before


def test_reconciliation_crashed_mid_apply_closes_the_day_once(make_stack: Callable[[str], Stack],
                                                              utility: Utility) -> None:
    stack = make_stack("mis.recon_mid_apply")
    account = utility.accounts[20]
    posted_serial = f"CP-{uuid.uuid4().hex[:10]}"
    _, err = until_definite(pay(stack, posted_serial, account, 3_000))
    assert err is None, err
    bank_only = f"CB-{uuid.uuid4().hex[:10]}"
    before = books_fen(utility.mis_db, account)
    eng = make_engine(utility.mis_db, pool_size=1)
    with eng.connect() as conn:
        day = conn.execute(sa.text("SELECT settlement_date FROM payments WHERE bank_serial = :s"),
                           {"s": posted_serial}).scalar_one()
    eng.dispose()
    day = str(day)[:10]
    records = [pb.BankRecord(bank_serial=posted_serial, account_no=account, amount_fen=3_000,
                             status=pb.BANK_RECORD_STATUS_POSTED),
               pb.BankRecord(bank_serial=bank_only, account_no=account, amount_fen=700,
                             status=pb.BANK_RECORD_STATUS_POSTED)]

    def reconcile() -> list[pb.ReconcileResponse]:
        msgs = [pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=day)),
                pb.ReconcileRequest(batch=pb.BankRecordBatch(records=records)),
                pb.ReconcileRequest(trailer=pb.ReconcileTrailer(record_count=2, total_fen=3_700))]
        return list(stack.stub.Reconcile(iter(msgs), timeout=60))

    with pytest.raises(grpc.RpcError):
        reconcile()
    stack.crashed()
    answer, err = until_definite(reconcile)
    assert err is None, err
    summary = [r.summary for r in answer if r.WhichOneof("body") == "summary"][0]  # type: ignore[attr-defined]
    assert not summary.replayed  # the crashed attempt applied nothing
    assert mis_rows(utility.mis_db, bank_only) == [("POSTED", 700)]
    assert books_fen(utility.mis_db, account) - before == 700
    again = [r.summary for r in reconcile() if r.WhichOneof("body") == "summary"][0]
    assert again.replayed and again.net_settlement_fen == summary.net_settlement_fen
