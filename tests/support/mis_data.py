"""Hand-made MIS rows for tests: banks, branches, customers and bills with
exactly the amounts and dates a test reasons about."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter import pay_pg
from mis_adapter.context import AdapterContext
from mis_adapter.db import metadata
from mis_adapter.db.core import Bank, BillRow, Branch, Customer
from mis_adapter.serve import build_server
from mis_adapter.settings import AdapterSettings
from yindian.v1 import billing_pb2_grpc
from yindian_common.clock import ManualClock
from yindian_common.fields import make_account_no

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
TODAY = dt.date(2026, 11, 28)
NOON = dt.datetime(2026, 11, 28, 12, 0, tzinfo=SHANGHAI)
BANKS = ("ICBC", "ABC")


@dataclass(frozen=True)
class BillSpec:
    period: str
    amount_fen: int
    due_date: dt.date
    kwh: int = 100


def add_bank(engine: Engine, bank_id: str, suspended: bool = False) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(Bank.__table__).values(bank_id=bank_id, name=bank_id, suspended=suspended,
                                                      suspended_reason="test" if suspended else "",
                                                      updated_at=NOON))


def add_account(engine: Engine, branch: str, serial: int, bills: Sequence[BillSpec] = (), *,
                tariff_class: str = "RESIDENTIAL", prepaid_fen: int = 0, status: str = "OPEN") -> str:
    acct = make_account_no(branch, serial)
    with engine.begin() as conn:
        if conn.execute(sa.select(Branch.__table__.c.code).where(Branch.__table__.c.code == branch)).first() is None:
            conn.execute(sa.insert(Branch.__table__).values(code=branch, name=f"branch {branch}"))
        conn.execute(sa.insert(Customer.__table__).values(
            account_no=acct, branch_code=branch, name="张三丰", address="人民路1号", phone="13812345678",
            tariff_class=tariff_class, status=status, prepaid_fen=prepaid_fen, opened_on=dt.date(2020, 1, 1)))
        for b in bills:
            conn.execute(sa.insert(BillRow.__table__).values(
                account_no=acct, period=b.period, kwh=b.kwh, amount_fen=b.amount_fen, prepaid_applied_fen=0,
                principal_paid_fen=0, late_fee_paid_fen=0, accrual_micro=0, accrual_date=b.due_date,
                due_date=b.due_date, issued_at=NOON - dt.timedelta(days=40), status="UNPAID", paid_on=None,
                dunning=False))
    return acct


def row_counts(engines: Sequence[Engine]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, engine in enumerate(engines):
        with engine.connect() as conn:
            for t in metadata.sorted_tables:
                out[f"{i}.{t.name}"] = conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
    return out


@dataclass
class RunningAdapter:
    ctx: AdapterContext
    clock: ManualClock
    address: str
    channel: grpc.Channel
    stub: billing_pb2_grpc.BillingServiceStub

    @property
    def engine(self) -> Engine:
        return self.ctx.router.primary

    def md(self, bank_id: str = "ICBC") -> list[tuple[str, str]]:
        return [("x-yindian-bank-id", bank_id)]


@contextmanager
def running_adapter(db_url: str, **overrides: object) -> Iterator[RunningAdapter]:
    """An in-process mis_adapter on 127.0.0.1:0 over a migrated database with the test banks."""
    fields: dict[str, object] = {"bank_status_ttl_s": 0.0, "grace_s": 2.0, **overrides}
    settings = AdapterSettings(db=db_url, listen="127.0.0.1:0", insecure=True, **fields)  # type: ignore[arg-type]
    clock = ManualClock(NOON)
    server, ctx = build_server(settings, clock)
    for b in BANKS:
        add_bank(ctx.router.primary, b)
    server.start()
    address = f"127.0.0.1:{server.port}"
    channel = grpc.insecure_channel(address)
    try:
        yield RunningAdapter(ctx, clock, address, channel, billing_pb2_grpc.BillingServiceStub(channel))
    finally:
        channel.close()
        server.stop()


def pay_read_prepared(engine: Engine) -> int:
    """How many of the connections the next pay lands on have Pay's READ (or its one-trip call of yd_pay)
    prepared (1) or not (0): psycopg forgets a connection's prepared statements at every ROLLBACK, so a
    write-free path that ends in one shows here as 0. The next pay's connection is a kept one
    (pay_pg.KeptConnections) once pays have opened one, else the pool's next checkout (the check's own
    transaction ends in COMMIT)."""
    sql = ("SELECT (COUNT(*) > 0)::int FROM pg_prepared_statements "
           "WHERE statement LIKE '%pg_advisory_xact_lock_shared%' OR statement LIKE '%FROM yd_pay(%'")
    kept_pool = pay_pg.kept_connections(engine)
    if kept_pool is not None and kept_pool.open_count:
        kept = kept_pool.take()
        assert kept is not None
        try:
            return int(kept.raw.execute(sql).fetchone()[0])
        finally:
            kept_pool.give_back(kept)
    with engine.connect() as conn, conn.begin():
        return int(conn.execute(sa.text(sql)).scalar_one())
