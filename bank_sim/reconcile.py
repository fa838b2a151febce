"""`python -m bank_sim reconcile`: the bank core's end-of-day reconciliation
(日终对账). Streams its ledger's POSTED and CANCELLED records of a settlement
date through the bridge (header, batches, trailer with count and total),
prints each discrepancy the utility reports and the summary.

The bank core first makes sure nothing of its own is in doubt: a PENDING row
(money taken, outcome unknown) is retried by the teller with the same serial
until definite, so reconciling around it could count it one-sided; the day
is refused locally while any exists. (The bridge then checks its own journal
the same way, and the utility closes the day.)

Memory is flat: records are read from the ledger and sent batch by batch."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from pydantic import Field
from rich.table import Table

from bank_sim import ledger
from bank_sim.settings import LinkSettings
from bank_sim.teller import link_channel
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.clock import business_date, make_clock
from yindian_common.db import make_engine
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.settings import add_settings_flags, load_settings
from yindian_common.status import error_info

OUTCOME_NAMES = {pb.RECONCILE_OUTCOME_MATCHED: "MATCHED", pb.RECONCILE_OUTCOME_BANK_ONLY: "BANK_ONLY",
                 pb.RECONCILE_OUTCOME_UTILITY_ONLY: "UTILITY_ONLY", pb.RECONCILE_OUTCOME_MISMATCH: "MISMATCH"}
STATUS_PB = {ledger.POSTED: pb.BANK_RECORD_STATUS_POSTED, ledger.CANCELLED: pb.BANK_RECORD_STATUS_CANCELLED}


class ReconcileSettings(LinkSettings):
    """`python -m bank_sim reconcile`: end-of-day reconciliation through the bridge."""

    db: str = Field("sqlite:///var/bank_sim.db", description="the bank core's database URL")
    date: str = Field("", description="settlement date YYYY-MM-DD (default: today's business date)")
    batch_records: int = Field(1_000, description="ledger records per stream message")
    recon_deadline_s: float = Field(900.0, description="deadline of the whole reconciliation call")
    lines_kept_max: int = Field(50, description="discrepancy lines kept for the summary (all are printed)")
    clock_start: str | None = Field(None, description="ISO instant the bank's clock starts at (default: now)")
    summary_json: str | None = Field(None, description="also write the outcome as JSON to this file")


class ReconcileRefused(Exception):
    """The day could not be reconciled (in doubt, refused by the bridge or the utility)."""


@dataclass
class ReconOutcome:
    settlement_date: str
    record_count: int = 0
    total_fen: int = 0
    totals: dict[str, tuple[int, int]] = field(default_factory=dict)
    net_settlement_fen: int = 0
    # refunds the utility paid back this day (net_settlement_fen is net of them)
    refund_count: int = 0
    refund_fen: int = 0
    replayed: bool = False
    discrepancies: int = 0
    lines: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"settlement_date": self.settlement_date, "record_count": self.record_count,
                "total_fen": self.total_fen, "net_settlement_fen": self.net_settlement_fen,
                "refund_count": self.refund_count, "refund_fen": self.refund_fen,
                "replayed": self.replayed, "discrepancies": self.discrepancies,
                "totals": {k: {"count": c, "amount_fen": f} for k, (c, f) in self.totals.items()},
                "lines": self.lines}


def requests(engine: sa.Engine, bank_id: str, day: dt.date, batch_records: int,
             out: ReconOutcome) -> Iterator[pb.ReconcileRequest]:
    yield pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=day.isoformat()))
    batch = pb.BankRecordBatch()
    with engine.connect() as conn:
        for row in ledger.day_records(conn, bank_id, day):
            batch.records.add(bank_serial=row.bank_serial, account_no=row.account_no, amount_fen=row.amount_fen,
                              status=STATUS_PB[row.status])
            out.record_count += 1
            out.total_fen += row.amount_fen
            if len(batch.records) >= batch_records:
                yield pb.ReconcileRequest(batch=batch)
                batch = pb.BankRecordBatch()
    if batch.records:
        yield pb.ReconcileRequest(batch=batch)
    yield pb.ReconcileRequest(trailer=pb.ReconcileTrailer(record_count=out.record_count, total_fen=out.total_fen))


def reconcile_day(settings: ReconcileSettings, engine: sa.Engine, channel: grpc.Channel, day: dt.date,
                  echo: Any = None) -> ReconOutcome:
    with engine.connect() as conn:
        pending = ledger.pending_rows(conn, settings.bank_id, limit=1)
    if pending:
        raise ReconcileRefused(f"payment {pending[0].bank_serial} is still PENDING at the bank core: "
                               "retry it until definite, then reconcile")
    out = ReconOutcome(day.isoformat())
    stub = billing_pb2_grpc.BillingServiceStub(channel)
    metadata = ((BANK_ID_METADATA, settings.bank_id),) if settings.insecure else ()
    try:
        for resp in stub.Reconcile(requests(engine, settings.bank_id, day, settings.batch_records, out),
                                   metadata=metadata, timeout=settings.recon_deadline_s):
            if resp.WhichOneof("body") == "discrepancies":
                for d in resp.discrepancies.discrepancies:
                    _line(out, d, settings.lines_kept_max, echo)
            else:
                s = resp.summary
                out.totals = {OUTCOME_NAMES[t.outcome]: (t.count, t.amount_fen) for t in s.totals}
                out.net_settlement_fen = s.net_settlement_fen
                out.refund_count, out.refund_fen = s.refund_count, s.refund_fen
                out.replayed = s.replayed
                out.record_count = s.record_count
    except grpc.RpcError as exc:
        info = error_info(exc)
        reason = f" ({info.reason})" if info is not None else ""
        raise ReconcileRefused(f"{exc.code().name}{reason}: {exc.details()}") from exc  # type: ignore[attr-defined]
    return out


def _line(out: ReconOutcome, d: pb.Discrepancy, kept_max: int, echo: Any) -> None:
    out.discrepancies += 1
    line = {"bank_serial": d.bank_serial, "outcome": OUTCOME_NAMES.get(d.outcome, "?"),
            "bank_amount_fen": d.bank_amount_fen, "mis_amount_fen": d.mis_amount_fen, "detail": d.detail}
    if len(out.lines) < kept_max:
        out.lines.append(line)
    if echo is not None:
        echo(f"{line['outcome']:<13} {d.bank_serial:<32} bank={d.bank_amount_fen} mis={d.mis_amount_fen} {d.detail}")


def render(out: ReconOutcome, bank_id: str) -> Table:
    title = f"Reconciliation of {bank_id}'s {out.settlement_date}" + (" (stored result)" if out.replayed else "")
    t = Table(title=title)
    t.add_column("outcome")
    t.add_column("records", justify="right")
    t.add_column("amount (yuan)", justify="right")
    for name in OUTCOME_NAMES.values():
        count, fen = out.totals.get(name, (0, 0))
        t.add_row(name, f"{count:,}", f"{fen / 100:,.2f}")
    if out.refund_count:
        t.add_row("refunds to the bank", f"{out.refund_count:,}", f"{-out.refund_fen / 100:,.2f}")
    t.add_row("net settlement", "", f"{out.net_settlement_fen / 100:,.2f}")
    t.add_row("records sent", f"{out.record_count:,}", "")
    return t


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim reconcile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_flags(parser, ReconcileSettings)
    args = parser.parse_args(argv)
    settings = load_settings(ReconcileSettings, args, args.config_file)
    day = (dt.date.fromisoformat(settings.date) if settings.date
           else business_date(make_clock(settings.clock_start)))
    engine = make_engine(settings.db)
    channel = link_channel(settings)
    try:
        out = reconcile_day(settings, engine, channel, day, echo=print)
    except ReconcileRefused as exc:
        print(f"reconciliation of {day} refused: {exc}", file=sys.stderr)
        return 2
    finally:
        channel.close()
        engine.dispose()
    print(f"reconciled {settings.bank_id} {day}: records={out.record_count} "
          + " ".join(f"{k}={c}/{f}" for k, (c, f) in out.totals.items())
          + f" refund_count={out.refund_count} refund_fen={out.refund_fen}"
          + f" net_settlement_fen={out.net_settlement_fen}" + (" replayed" if out.replayed else ""))
    if settings.summary_json:
        Path(settings.summary_json).write_text(json.dumps(out.to_json(), indent=2), encoding="utf-8")
    return 0


def demo_step(day: Any) -> None:
    """bank_sim demo-day's end-of-day step: reconcile the day through the bridge."""
    s = day.settings
    settings = load_settings(ReconcileSettings, {
        "target": day.servers["bridge"].grpc_addr, "bank_id": s.bank_id, "insecure": True, "db": day.bank_db,
        "clock_start": s.clock_start})
    when = business_date(make_clock(s.clock_start))
    engine = make_engine(settings.db)
    channel = link_channel(settings)
    try:
        out = reconcile_day(settings, engine, channel, when)
    except ReconcileRefused as exc:
        raise RuntimeError(f"reconciliation refused: {exc}") from exc
    finally:
        channel.close()
        engine.dispose()
    day.sections.append(render(out, s.bank_id))
    day.facts["reconciliation"] = out.to_json()
    matched = out.totals.get("MATCHED", (0, 0))[0]
    day.console.print(f"  reconciled {out.record_count:,} records: {matched:,} matched, {out.discrepancies} "
                      f"discrepancies, net settlement {out.net_settlement_fen / 100:,.2f} yuan")
    if out.discrepancies:
        raise RuntimeError(f"{out.discrepancies} discrepancies between the bank and the utility")
