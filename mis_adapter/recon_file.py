"""`python -m mis_adapter reconcile --db URL --bank B --date D --file F`:
reconciles a bank's day from the daily file it sends (对账文件), for banks
that do not use the Reconcile stream. Same rule and storage as the stream
(recon.Reconciliation; with `--branch-db CODE=URL` the day across every
branch database through recon_branches, all or nothing, exactly as the
stream does); prints the summary and the discrepancy lines.

File format (UTF-8 CSV):

    bank_serial,account_no,amount_fen,status        <- header line, exactly
    P20261128000001,0100000012,12345,POSTED         <- one line per record
    ...                                                (status POSTED or CANCELLED)
    TRAILER,<record count>,<total fen of all records>

A malformed or inconsistent file (a bad line, a wrong trailer count or total,
a duplicate serial, a missing trailer, anything after it) is rejected whole:
every problem found is printed with its line number (up to a bound) and
nothing is applied. Exit status: 0 reconciled (or replayed), 2 rejected."""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mis_adapter import recon_branches, recon_staging
from mis_adapter.db.base import table_of
from mis_adapter.db.core import Bank
from mis_adapter.matching import StagedRecord
from mis_adapter.migrate import upgrade
from mis_adapter.recon import ReconSummary
from mis_adapter.routing import BranchRouter
from mis_adapter.settings import AdapterSettings
from yindian_common.clock import DEFAULT_TZ, business_date, make_clock
from yindian_common.errors import FileRejected, InvalidField
from yindian_common.settings import load_settings

HEADER = ["bank_serial", "account_no", "amount_fen", "status"]
TRAILER_TAG = "TRAILER"
FILE_ERRORS_MAX = 20          # problems listed before giving up on the file
FILE_LINE_CHARS_MAX = 256     # a longer line is malformed
FILE_BATCH_RECORDS = 5_000    # records parsed before each bulk load


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from enumerate(csv.reader(f), start=1)


def _record(line_no: int, row: list[str]) -> StagedRecord:
    if len(row) != len(HEADER):
        raise InvalidField(f"line {line_no}", f"expected {len(HEADER)} fields, found {len(row)}")
    if sum(len(c) for c in row) > FILE_LINE_CHARS_MAX:
        raise InvalidField(f"line {line_no}", f"longer than {FILE_LINE_CHARS_MAX} characters")
    serial, account, amount_text, status = (c.strip() for c in row)
    if not amount_text.isascii() or not amount_text.isdigit():
        raise InvalidField(f"line {line_no}.amount_fen", "must be a positive integer number of fen")
    rec = (line_no, serial, account, int(amount_text), status)
    recon_staging.validate_record(rec, f"line {line_no}")
    return rec


def load_file(run: Any, path: Path) -> None:
    """Parses, validates and loads the whole file into `run`; raises
    FileRejected listing the problems (nothing is applied then)."""
    problems: list[str] = []
    batch: list[StagedRecord] = []
    trailer: tuple[int, list[str]] | None = None
    saw_header = False
    for line_no, row in _lines(path):
        if len(problems) >= FILE_ERRORS_MAX:
            problems.append(f"stopped after {FILE_ERRORS_MAX} problems")
            break
        if not saw_header:
            saw_header = True
            if [c.strip() for c in row] != HEADER:
                problems.append(f"line {line_no}: the header must be {','.join(HEADER)}")
            continue
        if trailer is not None:
            problems.append(f"line {line_no}: nothing may follow the trailer (line {trailer[0]})")
            continue
        if row and row[0].strip() == TRAILER_TAG:
            trailer = (line_no, row)
            continue
        try:
            batch.append(_record(line_no, row))
        except InvalidField as err:
            problems.append(err.message)
        if len(batch) >= FILE_BATCH_RECORDS:
            run.load(batch, where="line")
            batch = []
    if batch:
        run.load(batch, where="line")
    if not saw_header:
        problems.append("line 1: the file is empty")
    elif trailer is None:
        problems.append("no trailer line: TRAILER,<record count>,<total fen>")
    else:
        problems.extend(_trailer_problems(run, *trailer))
    if problems:
        raise FileRejected(problems)


def _trailer_problems(run: Any, line_no: int, row: list[str]) -> list[str]:
    cells = [c.strip() for c in row]
    if len(cells) != 3 or not all(c.isascii() and c.isdigit() for c in cells[1:]):
        return [f"line {line_no}: the trailer must be TRAILER,<record count>,<total fen>"]
    try:
        run.check_trailer(int(cells[1]), int(cells[2]), field=f"line {line_no}")
    except InvalidField as err:
        return [err.message.replace(".record_count:", ": record count").replace(".total_fen:", ": total fen")]
    return []


def reconcile_file(router: BranchRouter, settings: AdapterSettings, bank_id: str, day: dt.date, path: Path,
                   now: dt.datetime) -> ReconSummary:
    """`run` is a recon.Reconciliation, or a recon_branches.BranchReconciliation with branch databases."""
    stored = recon_branches.day_summary(router, bank_id, day)
    if stored is not None:
        return stored
    with recon_branches.reconciliation(router, bank_id, day, rates=settings.late_fee_rates(), now=now) as run:
        try:
            load_file(run, path)
            return run.close_day(where="line")  # type: ignore[no-any-return]
        except InvalidField as err:
            raise FileRejected([err.message.replace("line.bank_serial: ", "")]) from None


def print_result(router: BranchRouter, summary: ReconSummary) -> None:
    tag = " (stored result: the day was already reconciled)" if summary.replayed else ""
    print(f"reconciled bank={summary.bank_id} date={summary.settlement_date} records={summary.record_count}{tag}")
    print(f"{'outcome':<14}{'count':>10}{'amount_fen':>16}")
    for t in summary.totals:
        print(f"{t.outcome:<14}{t.count:>10}{t.amount_fen:>16}")
    print(f"net_settlement_fen={summary.net_settlement_fen}")
    for page in recon_branches.day_lines(router, summary.bank_id, summary.settlement_date):
        for d in page:
            where = f"line {d.bank_line_no}" if d.bank_line_no else "MIS only"
            print(f"{d.outcome:<13} {d.bank_serial:<32} {where:<12} bank={d.bank_account_no or '-'}/"
                  f"{d.bank_amount_fen}/{d.bank_status or '-'} mis={d.mis_account_no or '-'}/{d.mis_amount_fen}/"
                  f"{d.mis_state or '-'} {d.detail}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mis_adapter reconcile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="SQLAlchemy URL of the MIS database")
    p.add_argument("--branch-db", action="append", default=[],
                   help="CODE=URL (repeatable): a branch's own database, as `serve` is given them")
    p.add_argument("--front-db", default="", help="the front database holding the serial registry "
                   "(default: --db), as `serve` is given it")
    p.add_argument("--bank", required=True, help="the bank whose day this is (bank id, e.g. ICBC)")
    p.add_argument("--date", required=True, help="settlement date YYYY-MM-DD")
    p.add_argument("--file", required=True, help="the bank's daily reconciliation file (CSV)")
    p.add_argument("--clock-start", default="", help="run the clock from this ISO instant (tests, demos)")
    p.add_argument("--timezone", default=DEFAULT_TZ, help="the utility's time zone: business dates")
    args = p.parse_args(argv)
    settings = load_settings(AdapterSettings, {"db": args.db, "branch_db": args.branch_db,
                                               "front_db": args.front_db, "timezone": args.timezone})
    clock = make_clock(args.clock_start or None, args.timezone)
    try:
        day = dt.date.fromisoformat(args.date)
    except ValueError:
        p.error("--date must be YYYY-MM-DD")
    if day > business_date(clock):
        p.error(f"--date {day} is in the future")
    router = BranchRouter.from_specs(args.db, args.branch_db, front_url=args.front_db)
    try:
        for engine in router.all_engines():
            upgrade(engine)
        with router.primary.connect() as conn:
            if conn.execute(sa.select(table_of(Bank).c.bank_id).where(table_of(Bank).c.bank_id == args.bank)
                            ).first() is None:
                print(f"rejected: bank {args.bank} is unknown to the utility", file=sys.stderr)
                return 2
        try:
            summary = reconcile_file(router, settings, args.bank, day, Path(args.file), clock.now())
        except FileRejected as rej:
            print(f"rejected: {args.file}: nothing applied", file=sys.stderr)
            for problem in rej.problems:
                print(f"  {problem}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"rejected: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
            return 2
        print_result(router, summary)
        return 0
    finally:
        router.dispose()
