"""The bank core's side of the link's other transactions: agreements signed
and ended at the counter (签约/解约), refunds credited to passbooks, and the
day's sign-off (`python -m bank_sim refunds --target BRIDGE --db BANK_DB`).

Refunds, exactly once on the bank's side: `credit_refunds` lists the
utility's outstanding refunds and, in ONE transaction, records each new one
in `refund_credits` (keyed by the utility's refund_id) and credits its
passbook; a refund listed again (the bank died before acknowledging, or the
acknowledgement was lost) is already there and is not credited twice.
`acknowledge_credited` then acknowledges every credited, unacknowledged
refund with the bank's credit serial `RF-<refund_id>` (a replay is harmless:
the utility answers it as one) and marks it acknowledged.

Functions given a Connection never commit; the others own their
transactions. Every call has a deadline; batches are bounded."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import grpc
import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.engine import Engine

from bank_sim import ledger
from bank_sim.settings import LinkSettings
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.clock import Clock, make_clock
from yindian_common.db import make_engine
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.server import TlsFiles, open_channel
from yindian_common.settings import add_settings_flags, load_settings

log = logging.getLogger("bank_sim.link")

REFUND_PAGE_MAX = 500     # refunds listed (and acknowledged) per call
CREDIT_PREFIX = "RF-"

refund_credits = ledger.refund_credits


def create_schema(engine: Engine) -> None:
    ledger.create_schema(engine)  # refund_credits is one of the ledger's tables


def credit_serial_of(refund_id: int) -> str:
    return f"{CREDIT_PREFIX}{refund_id}"


@dataclass(frozen=True)
class RefundRun:
    listed: int
    credited: int
    credited_fen: int
    acknowledged: int


def _md(settings: LinkSettings) -> tuple[tuple[str, str], ...]:
    return ((BANK_ID_METADATA, settings.bank_id),) if settings.insecure else ()


def credit_refunds(engine: Engine, stub: billing_pb2_grpc.BillingServiceStub, bank_id: str, clock: Clock, *,
                   timeout_s: float, metadata_: tuple[tuple[str, str], ...] = ()) -> tuple[int, int, int]:
    """Lists outstanding refunds and credits the new ones: (listed, credited, credited_fen)."""
    listed = stub.ListRefunds(pb.ListRefundsRequest(page_size=REFUND_PAGE_MAX), timeout=timeout_s,
                              metadata=metadata_).refunds
    if not listed:
        return 0, 0, 0
    now = clock.now()
    credited = credited_fen = 0
    with engine.begin() as conn:
        known = set(conn.execute(sa.select(refund_credits.c.refund_id).where(
            refund_credits.c.bank_id == bank_id,
            refund_credits.c.refund_id.in_([r.refund_id for r in listed]))).scalars())
        for r in listed:
            if r.refund_id in known:
                continue
            conn.execute(refund_credits.insert().values(
                bank_id=bank_id, refund_id=r.refund_id, account_no=r.account_no, amount_fen=r.amount_fen,
                original_serial=r.original_serial, credit_serial=credit_serial_of(r.refund_id), credited_at=now,
                acknowledged_at=None))
            if conn.execute(ledger.savings.update().where(
                    ledger.savings.c.bank_id == bank_id, ledger.savings.c.account_no == r.account_no)
                    .values(balance_fen=ledger.savings.c.balance_fen + r.amount_fen)).rowcount != 1:
                # No passbook for it here (closed meanwhile): opened with the refund as its balance.
                conn.execute(ledger.savings.insert().values(bank_id=bank_id, account_no=r.account_no,
                                                            opening_balance_fen=0, balance_fen=r.amount_fen,
                                                            opened_at=now))
            credited += 1
            credited_fen += r.amount_fen
    log.info("event=refunds_credited listed=%d credited=%d fen=%d", len(listed), credited, credited_fen)
    return len(listed), credited, credited_fen


def acknowledge_credited(engine: Engine, stub: billing_pb2_grpc.BillingServiceStub, bank_id: str, clock: Clock,
                         *, timeout_s: float, metadata_: tuple[tuple[str, str], ...] = ()) -> int:
    """Acknowledges credited refunds the utility has not confirmed yet; returns how many."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(refund_credits).where(
            refund_credits.c.bank_id == bank_id, refund_credits.c.acknowledged_at.is_(None))
            .order_by(refund_credits.c.refund_id).limit(REFUND_PAGE_MAX)).all()
    if not rows:
        return 0
    stub.AcknowledgeRefunds(pb.AcknowledgeRefundsRequest(acks=[
        pb.RefundAck(refund_id=r.refund_id, credit_serial=r.credit_serial, amount_fen=r.amount_fen) for r in rows]),
        timeout=timeout_s, metadata=metadata_)
    with engine.begin() as conn:
        conn.execute(refund_credits.update().where(
            refund_credits.c.bank_id == bank_id,
            refund_credits.c.refund_id.in_([r.refund_id for r in rows])).values(acknowledged_at=clock.now()))
    return len(rows)


def credited_totals(conn: sa.Connection, bank_id: str) -> dict[str, int]:
    """Counts and fen of the refunds credited to passbooks (the bank's side of the day's refunds)."""
    n, fen, acked = conn.execute(sa.select(
        sa.func.count(), sa.func.coalesce(sa.func.sum(refund_credits.c.amount_fen), 0),
        sa.func.count(refund_credits.c.acknowledged_at)).where(refund_credits.c.bank_id == bank_id)).one()
    return {"credited": int(n), "credited_fen": int(fen), "acknowledged": int(acked)}


# ---- agreements at the counter ----

def sign_at_counter(engine: Engine, stub: billing_pb2_grpc.BillingServiceStub, bank_id: str, account_no: str,
                    serial: str, clock: Clock, *, timeout_s: float, opening_balance_fen: int,
                    metadata_: tuple[tuple[str, str], ...] = (), debit_limit_fen: int | None = None) -> Any:
    """A customer signs auto-debit at the counter: the passbook is opened (if new), then the agreement is
    signed with the utility (idempotent by serial: a retry after a lost answer is safe)."""
    with engine.begin() as conn:
        exists = conn.execute(sa.select(ledger.savings.c.account_no).where(
            ledger.savings.c.bank_id == bank_id, ledger.savings.c.account_no == account_no)).first()
        if exists is None:
            conn.execute(ledger.savings.insert().values(bank_id=bank_id, account_no=account_no,
                                                        opening_balance_fen=opening_balance_fen,
                                                        balance_fen=opening_balance_fen, opened_at=clock.now()))
    req = pb.SignAgreementRequest(agreement_serial=serial, account_no=account_no,
                                  savings_account_ref=f"PB-{account_no}")
    if debit_limit_fen is not None:
        req.debit_limit_fen = debit_limit_fen
    return stub.SignAgreement(req, timeout=timeout_s, metadata=metadata_)


def end_at_counter(stub: billing_pb2_grpc.BillingServiceStub, account_no: str, serial: str, *, timeout_s: float,
                   metadata_: tuple[tuple[str, str], ...] = (), reason: str = "customer request") -> Any:
    return stub.EndAgreement(pb.EndAgreementRequest(end_serial=serial, account_no=account_no, reason=reason),
                             timeout=timeout_s, metadata=metadata_)


# ---- `python -m bank_sim refunds` ----

class RefundSettings(LinkSettings):
    db: str = Field("sqlite:///var/bank_sim.db", description="the bank core's database URL")
    clock_start: str | None = Field(None, description="ISO instant the bank's clock starts at (default: now)")


def run_refunds(engine: Engine, stub: billing_pb2_grpc.BillingServiceStub, bank_id: str, clock: Clock, *,
                timeout_s: float, metadata_: tuple[tuple[str, str], ...] = ()) -> RefundRun:
    """One round: credit what is listed, then acknowledge everything credited."""
    listed, credited, fen = credit_refunds(engine, stub, bank_id, clock, timeout_s=timeout_s, metadata_=metadata_)
    acked = acknowledge_credited(engine, stub, bank_id, clock, timeout_s=timeout_s, metadata_=metadata_)
    return RefundRun(listed, credited, fen, acked)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim refunds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_flags(parser, RefundSettings)
    args = parser.parse_args(argv)
    s = load_settings(RefundSettings, args, args.config_file)
    tls = TlsFiles(s.tls_cert, s.tls_key, s.tls_ca) if s.tls_cert and s.tls_key and s.tls_ca else None
    engine = make_engine(s.db, pool_size=2)
    channel = open_channel(s.target, tls=tls, insecure=s.insecure)
    try:
        create_schema(engine)
        clock = make_clock(s.clock_start or None)
        r = run_refunds(engine, billing_pb2_grpc.BillingServiceStub(channel), s.bank_id, clock,
                        timeout_s=s.rpc_deadline_s, metadata_=_md(s))
    except grpc.RpcError as exc:
        print(f"refunds failed: {exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
        return 1
    finally:
        channel.close()
        engine.dispose()
    print(f"refunds listed={r.listed} credited={r.credited} credited_fen={r.credited_fen} "
          f"acknowledged={r.acknowledged}")
    return 0

