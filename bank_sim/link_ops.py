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
from pathlib import Path
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

REPO = Path(__file__).resolve().parents[1]
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



# ---- the demo day's steps (bank_sim demo-day) ----

DEMO_SIGNS = 8             # households signing auto-debit at the counter
DEMO_ENDS = 3              # roster households ending theirs (解约)
DEMO_PAID_ELSEWHERE = 2    # newly signed households that pay their new bill at another bank first
DEMO_OPENING_FEN = 300_000
DEMO_CANDIDATES_MAX = 2_000
DEMO_OTHER_BANK = "ABC"


def _demo_stub(day: Any) -> tuple[grpc.Channel, billing_pb2_grpc.BillingServiceStub]:
    channel = open_channel(day.servers["bridge"].grpc_addr, tls=None, insecure=True)
    return channel, billing_pb2_grpc.BillingServiceStub(channel)


def _unsigned_accounts(day: Any, stub: billing_pb2_grpc.BillingServiceStub, n: int) -> list[str]:
    """Open accounts on no bank's roster, found over the wire (QueryAccount)."""
    from yindian_common.fields import make_account_no

    rostered: set[str] = set()
    for path in day.roster_dir.glob("*.csv"):
        rostered.update(ledger.read_roster(path))
    out: list[str] = []
    for i in range(DEMO_CANDIDATES_MAX):
        acct = make_account_no(f"{1 + i % 8:02d}", 1 + i // 8)
        if acct in rostered:
            continue
        try:
            view = stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), timeout=5.0)
        except grpc.RpcError:
            continue
        if not view.closed and view.arrears_fen == 0 and view.prepaid_fen == 0:
            out.append(acct)
            if len(out) == n:
                break
    return out


def demo_agreements_step(day: Any) -> None:
    """At the counter: households sign auto-debit (签约) and a few end theirs (解约); the operator has
    configured this bank to get over-debits back as refunds."""
    from rich.table import Table

    from bank_sim.processes import run_command

    s = day.settings
    run_command("refund-mode", ["mis_adapter", "bank", "refund-mode", s.bank_id, "refund", "--db", day.mis_db],
                log_dir=day.work, timeout_s=s.step_timeout_s, cwd=REPO)
    clock = make_clock(s.clock_start)
    engine = make_engine(day.bank_db, pool_size=2)
    create_schema(engine)
    channel, stub = _demo_stub(day)
    try:
        signed = []
        for acct in _unsigned_accounts(day, stub, DEMO_SIGNS):
            r = sign_at_counter(engine, stub, s.bank_id, acct, f"AG-DEMO-{acct}", clock, timeout_s=5.0,
                                opening_balance_fen=DEMO_OPENING_FEN)
            signed.append(r.agreement.account_no)
        ended = []
        for acct in ledger.read_roster(day.roster_dir / f"{s.bank_id}.csv")[:DEMO_ENDS]:
            r = end_at_counter(stub, acct, f"END-DEMO-{acct}", timeout_s=5.0)
            ended.append((acct, r.withdrawn_notices))
        listed = stub.ListAgreements(pb.ListAgreementsRequest(page_size=500, active_only=True), timeout=5.0)
    finally:
        channel.close()
        engine.dispose()
    day.facts["agreements"] = {"signed": signed, "ended": [a for a, _ in ended],
                               "active_first_page": len(listed.agreements)}
    table = Table(title=f"Auto-debit agreements at the {s.bank_id} counter (签约/解约)")
    table.add_column("what")
    table.add_column("households", justify="right")
    table.add_row("signed (their next bill is fed)", f"{len(signed):,}")
    table.add_row("ended (their bills are no longer fed)", f"{len(ended):,}")
    table.add_row("active agreements (first page of ListAgreements)", f"{len(listed.agreements):,}")
    day.sections.append(table)
    day.console.print(f"  signed {len(signed)}, ended {len(ended)} agreements at the counter")


def demo_paid_elsewhere(day: Any) -> None:
    """After issuance, before the auto-debit: a few newly signed households pay their new bill at another
    bank's counter, so the bank's debit meets a settled bill and comes back as a refund."""
    signed = day.facts.get("agreements", {}).get("signed", [])[:DEMO_PAID_ELSEWHERE]
    channel = open_channel(day.servers["mis_adapter"].grpc_addr, tls=None, insecure=True)
    stub = billing_pb2_grpc.BillingServiceStub(channel)
    md = ((BANK_ID_METADATA, DEMO_OTHER_BANK),)
    paid = 0
    try:
        for i, acct in enumerate(signed):
            due = stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), timeout=5.0, metadata=md).total_due_fen
            if due > 0:
                stub.Pay(pb.PayRequest(bank_serial=f"DEMO-ELSEWHERE-{i}", account_no=acct, amount_fen=due,
                                       outlet_code="ABC01", teller_id="T1", channel=pb.CHANNEL_COUNTER),
                         timeout=5.0, metadata=md)
                paid += 1
    finally:
        channel.close()
    day.facts["paid_elsewhere"] = paid


def demo_refunds_step(day: Any) -> None:
    """The utility's refunds (debits that met bills paid elsewhere) credited to passbooks, then acknowledged."""
    from rich.table import Table

    s = day.settings
    clock = make_clock(s.clock_start)
    engine = make_engine(day.bank_db, pool_size=2)
    channel, stub = _demo_stub(day)
    try:
        r = run_refunds(engine, stub, s.bank_id, clock, timeout_s=5.0)
        with engine.connect() as conn:
            broken = ledger.check_passbooks(conn, s.bank_id)
            totals = credited_totals(conn, s.bank_id)
    finally:
        channel.close()
        engine.dispose()
    if broken:
        raise RuntimeError(f"{broken} passbooks out of balance after the refunds")
    day.facts["refunds"] = {**totals, "listed": r.listed}
    table = Table(title=f"Refunds to {s.bank_id} (debits that met a bill already paid)")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("yuan", justify="right")
    table.add_row("credited to passbooks", f"{totals['credited']:,}", f"{totals['credited_fen'] / 100:,.2f}")
    table.add_row("acknowledged to the utility", f"{totals['acknowledged']:,}", "")
    day.sections.append(table)
    day.console.print(f"  refunds credited {totals['credited']} ({totals['credited_fen'] / 100:,.2f} yuan), "
                      f"acknowledged {totals['acknowledged']}")


def demo_sign_off_step(day: Any) -> None:
    """Day end (日终签退) through the bridge: later pays settle tomorrow; then the day is reconciled."""
    from bank_sim.processes import run_command

    run_command("sign-off", ["bridge", "sign-off", "--target", day.servers["bridge"].grpc_addr, "--insecure"],
                log_dir=day.work, timeout_s=day.settings.step_timeout_s, cwd=REPO)
    line = (day.work / "sign-off.log").read_text(encoding="utf-8").strip().splitlines()[-1]
    day.facts["sign_off"] = line
    day.console.print(f"  {line}")
