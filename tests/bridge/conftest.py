"""Fixtures for the bridge: a real, seeded mis_adapter process (SQLite MIS),
a frame-aware link between bridge and utility, and in-process bridges on
127.0.0.1:0 with their journal on SQLite."""
from __future__ import annotations

import itertools
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from bridge import journal as jn
from bridge.serve import Bridge
from bridge.settings import BridgeSettings
from tests.bridge.link import Link
from tests.support.databases import migrated_sqlite
from tests.support.procs import REPO, Proc, start
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine

BANK = "ICBC"
SEED_ACCOUNTS = 300


@dataclass
class Utility:
    proc: Proc
    mis_db: str
    accounts: Iterator[str]

    @property
    def address(self) -> str:
        return self.proc.grpc_addr

    def bank_admin(self, action: str) -> None:
        """The utility operator's 停工 (suspend) / 开工 (resume) of the test bank."""
        subprocess.run([sys.executable, "-m", "mis_adapter", "bank", action, BANK, "--db", self.mis_db],
                       cwd=REPO, check=True, timeout=60, capture_output=True)

    def get_payment(self, bank_serial: str) -> pb.GetPaymentResponse:
        """The utility's own answer, asked directly (not through the bridge)."""
        with grpc.insecure_channel(self.address) as ch:
            return billing_pb2_grpc.BillingServiceStub(ch).GetPayment(  # type: ignore[no-any-return]
                pb.GetPaymentRequest(bank_serial=bank_serial), timeout=10, metadata=[("x-yindian-bank-id", BANK)])

    def payment(self, bank_serial: str) -> dict[str, object] | None:
        """The MIS's payments row for this bank's serial."""
        eng = make_engine(self.mis_db, pool_size=1)
        try:
            with eng.connect() as conn:
                row = conn.execute(sa.text("SELECT state, amount_fen, account_no FROM payments "
                                           "WHERE bank_id = :b AND bank_serial = :s"),
                                   {"b": BANK, "s": bank_serial}).mappings().first()
        finally:
            eng.dispose()
        return dict(row) if row is not None else None


@pytest.fixture(scope="module")
def utility(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Utility]:
    work = tmp_path_factory.mktemp("utility")
    mis_db = migrated_sqlite(work / "mis.db")
    subprocess.run([sys.executable, "-m", "mis_adapter", "seed", "--db", mis_db, "--accounts", str(SEED_ACCOUNTS),
                    "--roster-dir", str(work / "rosters")], cwd=REPO, check=True, timeout=120, capture_output=True)
    eng = make_engine(mis_db, pool_size=1)
    with eng.connect() as conn:
        accounts = [r[0] for r in conn.execute(sa.text(
            "SELECT account_no FROM customers WHERE status = 'OPEN' ORDER BY account_no"))]
    eng.dispose()
    proc = start("mis_adapter", ["mis_adapter", "serve", "--db", mis_db, "--listen", "127.0.0.1:0",
                                 "--metrics-port", "0", "--insecure", "--bank-status-ttl-s", "0"], log_dir=work)
    yield Utility(proc, mis_db, itertools.cycle(accounts))
    assert proc.terminate() == 0


@pytest.fixture
def link(utility: Utility) -> Iterator[Link]:
    lk = Link(utility.address)
    yield lk
    lk.close()


@dataclass
class BankCore:
    """The bank core's side: a client of the bridge."""
    bridge: Bridge
    channel: grpc.Channel
    stub: billing_pb2_grpc.BillingServiceStub

    def pay(self, serial: str, account_no: str, amount_fen: int, timeout_s: float = 10.0) -> pb.PayResponse:
        return self.stub.Pay(pay_request(serial, account_no, amount_fen), timeout=timeout_s)  # type: ignore[no-any-return]


def pay_request(serial: str, account_no: str, amount_fen: int) -> pb.PayRequest:
    return pb.PayRequest(bank_serial=serial, account_no=account_no, amount_fen=amount_fen, outlet_code="OUT01",
                         teller_id="T01", channel=pb.CHANNEL_COUNTER)


def new_serial(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_bridge(tmp_path: Path) -> Iterator[Callable[..., BankCore]]:
    started: list[BankCore] = []

    def make(upstream: str, *, db: str | None = None, **over: object) -> BankCore:
        default_db = tmp_path / "bridge.db"
        if db is None and not default_db.exists():  # the journal schema copied, not migrated; a restart keeps it
            migrated_sqlite(default_db, "bridge")
        fields: dict[str, object] = {"listen": "127.0.0.1:0", "upstream": upstream, "bank_id": BANK,
                                     "insecure": True, "db": db or f"sqlite:///{default_db}",
                                     "resolver_enabled": False, "grace_s": 2.0, "metrics_port": 0,
                                     # no background SignOn: the fault-injecting link holds the first call it sees
                                     "sign_on_at_start": False}
        fields.update(over)
        b = Bridge(BridgeSettings(**fields))  # type: ignore[arg-type]
        b.start()
        ch = grpc.insecure_channel(b.address)
        core = BankCore(b, ch, billing_pb2_grpc.BillingServiceStub(ch))
        started.append(core)
        return core

    yield make
    for core in started:
        core.channel.close()
        core.bridge.stop()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """The bridge's journal schema on a fresh database of the test's back end (db_url)."""
    eng = make_engine(db_url, pool_size=4)
    jn.create_schema(eng)
    yield eng
    eng.dispose()
