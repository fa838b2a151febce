"""A real mis_adapter process over a SQLite MIS with hand-made households, for
the IVR and dunning tests, plus the operator's and a bank's gRPC clients."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import sqlalchemy as sa

from mis_adapter.db.core import Customer
from tests.support import procs
from tests.support.databases import migrated_sqlite
from tests.support.mis_data import BillSpec, add_account, add_bank
from yindian.v1 import billing_pb2 as bpb
from yindian.v1 import billing_pb2_grpc, customer_pb2_grpc
from yindian_common.db import make_engine

# 10:00 in Shanghai on the business day the MIS lives on.
CLOCK = "2026-11-28T10:00:00+08:00"
BANK_MD = (("x-yindian-bank-id", "ICBC"),)
IVR_OPERATOR = "ivr"
DUNNING_OPERATOR = "dunning"


@dataclass
class Mis:
    proc: procs.Proc
    url: str
    channel: grpc.Channel

    @property
    def addr(self) -> str:
        return self.proc.grpc_addr

    @property
    def billing(self) -> billing_pb2_grpc.BillingServiceStub:
        return billing_pb2_grpc.BillingServiceStub(self.channel)

    @property
    def customer(self) -> customer_pb2_grpc.CustomerServiceStub:
        return customer_pb2_grpc.CustomerServiceStub(self.channel)

    def query(self, account_no: str) -> bpb.QueryAccountResponse:
        return self.billing.QueryAccount(bpb.QueryAccountRequest(account_no=account_no), metadata=BANK_MD, timeout=10)

    def pay(self, account_no: str, serial: str, amount_fen: int) -> bpb.PayResponse:
        return self.billing.Pay(bpb.PayRequest(bank_serial=serial, account_no=account_no, amount_fen=amount_fen,
                                               outlet_code="O1", teller_id="T1", channel=bpb.CHANNEL_COUNTER),
                                metadata=BANK_MD, timeout=10)


def make_mis_db(tmp_path: Path, households: dict[int, tuple[list[BillSpec], str]]) -> tuple[str, dict[int, str]]:
    """SQLite MIS at tmp_path/mis.db: branch 01 households {serial: (bills, phone)}."""
    url = migrated_sqlite(tmp_path / "mis.db")
    engine = make_engine(url)
    add_bank(engine, "ICBC")
    accounts: dict[int, str] = {}
    t = Customer.__table__
    for serial, (bills, phone) in households.items():
        acct = add_account(engine, "01", serial, bills)
        with engine.begin() as conn:
            conn.execute(sa.update(t).where(t.c.account_no == acct).values(phone=phone))
        accounts[serial] = acct
    engine.dispose()
    return url, accounts


@contextmanager
def running_mis(tmp_path: Path, url: str, clock: str = CLOCK) -> Iterator[Mis]:
    proc = procs.start("mis_adapter", [
        "mis_adapter", "serve", "--db", url, "--listen", "127.0.0.1:0", "--metrics-port", "0", "--insecure",
        "--clock-start", clock, "--grace-s", "2",
        "--operator", IVR_OPERATOR, "--operator", DUNNING_OPERATOR,
        "--factorless-operator", IVR_OPERATOR, "--factorless-operator", DUNNING_OPERATOR,
        "--dunning-operator", DUNNING_OPERATOR], log_dir=tmp_path)
    channel = grpc.insecure_channel(proc.grpc_addr)
    try:
        yield Mis(proc, url, channel)
    finally:
        channel.close()
        proc.terminate()


def shanghai(iso_local: str) -> str:
    """'2026-11-28T10:00' → an ISO instant with the +08:00 offset."""
    return dt.datetime.fromisoformat(iso_local).replace(tzinfo=dt.timezone(dt.timedelta(hours=8))).isoformat()
