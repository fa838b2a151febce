"""`python -m mis_adapter report collections|arrears|arrears-detail`: the
business office's statistics from the MIS database, for any past period or
as-of date (reports.py reconstructs them from history).

    report collections     --from D --to D --by bank|outlet|branch|day|channel
    report arrears         --as-of D
    report arrears-detail  --as-of D [--branch CODE]
    report collections-detail --from D --to D [--bank B] [--outlet CODE]
                           each payment: time, bank, outlet, teller, amount,
                           the payer's bank balance after the debit, state

--format table (yuan, for people), csv or json (integer fen, for machines).
Names and phones in the detail are masked."""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

from mis_adapter import reports
from mis_adapter.routing import BranchRouter
from mis_adapter.settings import AdapterSettings
from yindian_common.clock import DEFAULT_TZ, business_date, make_clock
from yindian_common.errors import InvalidField
from yindian_common.fields import iso_date
from yindian_common.settings import load_settings

COLLECTION_COLUMNS = ["key", "count", "amount_fen", "cancelled_count", "cancelled_fen"]
ARREARS_COLUMNS = ["branch_code", "households", "principal_fen", "late_fee_fen"]
PAYMENT_COLUMNS = ["settlement_date", "posted_at", "bank_id", "bank_serial", "account_no", "amount_fen", "channel",
                   "outlet_code", "teller_id", "bank_balance_fen", "state", "reversed_on"]
DETAIL_COLUMNS = ["account_no", "customer_name", "contact_phone", "branch_code", "unpaid_bills", "principal_fen",
                  "late_fee_fen", "oldest_period"]


def yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100:,}.{abs(fen) % 100:02d}"


def emit(columns: list[str], rows: Iterable[dict[str, Any]], fmt: str, out: Any = None,
         meta: dict[str, Any] | None = None) -> None:
    """Writes rows as they come (the detail may be long): table, csv, or JSON lines after a header object."""
    out = out or sys.stdout
    if fmt == "csv":
        w = csv.writer(out)
        w.writerow(columns)
        for r in rows:
            w.writerow([r[c] for c in columns])
        return
    if fmt == "json":
        out.write(json.dumps({"report": meta or {}, "columns": columns}, ensure_ascii=False) + "\n")
        for r in rows:
            out.write(json.dumps({c: r[c] for c in columns}, ensure_ascii=False) + "\n")
        return
    titles = [c.removesuffix("_fen") + ("_yuan" if c.endswith("_fen") else "") for c in columns]
    if meta:
        out.write(" ".join(f"{k}={v}" for k, v in meta.items()) + "\n")
    out.write("".join(f"{t:>18}" for t in titles) + "\n")
    for r in rows:
        out.write("".join(f"{_cell(c, r[c]):>18}" for c in columns) + "\n")


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    return yuan(value) if column.endswith("_fen") else str(value)


def _with_total(rows: Iterable[Any], total: Any) -> Iterator[dict[str, Any]]:
    for r in rows:
        yield asdict(r)
    yield asdict(total)


def _detail_rows(pages: Iterator[list[reports.ArrearsAccount]]) -> Iterator[dict[str, Any]]:
    for page in pages:
        for a in page:
            yield asdict(a)


def _payment_rows(pages: Iterator[list[reports.CollectedPayment]]) -> Iterator[dict[str, Any]]:
    for page in pages:
        for p in page:
            row = asdict(p)
            row["posted_at"] = p.posted_at.astimezone(dt.UTC).isoformat()
            row["settlement_date"] = p.settlement_date.isoformat()
            row["reversed_on"] = p.reversed_on.isoformat() if p.reversed_on else ""
            yield row


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mis_adapter report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", choices=["collections", "arrears", "arrears-detail", "collections-detail"])
    p.add_argument("--db", required=True, help="SQLAlchemy URL of the MIS database")
    p.add_argument("--branch-db", action="append", default=[], help="CODE=URL (repeatable)")
    p.add_argument("--from", dest="from_date", default="", help="collections: first settlement date (default today)")
    p.add_argument("--to", dest="to_date", default="", help="collections: last settlement date (default today)")
    p.add_argument("--as-of", dest="as_of", default="", help="arrears: as of the end of this date (default today)")
    p.add_argument("--by", default="bank", choices=list(reports.GROUP_BYS), help="collections: grouping")
    p.add_argument("--branch", default="", help="arrears-detail: only this branch code")
    p.add_argument("--bank", default="", help="collections-detail: only this bank")
    p.add_argument("--outlet", default="", help="collections-detail: only this outlet code")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"])
    p.add_argument("--clock-start", default="", help="run the clock from this ISO instant (tests, demos)")
    p.add_argument("--timezone", default=DEFAULT_TZ, help="the utility's time zone: business dates")
    args = p.parse_args(argv)
    settings = load_settings(AdapterSettings, {"db": args.db, "timezone": args.timezone})
    clock = make_clock(args.clock_start or None, args.timezone)
    today = business_date(clock).isoformat()
    router = BranchRouter.from_specs(args.db, args.branch_db)
    engines = router.engines()
    try:
        if args.report == "collections":
            frm = iso_date(args.from_date or today, "--from")
            to = iso_date(args.to_date or today, "--to")
            rep = reports.collection_summary(engines, frm, to, args.by)
            emit(COLLECTION_COLUMNS, _with_total(rep.rows, rep.total), args.format,
                 meta={"report": "collections", "from": frm.isoformat(), "to": to.isoformat(), "by": args.by})
        elif args.report == "arrears":
            as_of = iso_date(args.as_of or today, "--as-of")
            arr = reports.arrears_summary(engines, as_of, settings.late_fee_rates(), clock.tz)
            emit(ARREARS_COLUMNS, _with_total(arr.rows, arr.total), args.format,
                 meta={"report": "arrears", "as_of": as_of.isoformat()})
        elif args.report == "collections-detail":
            frm = iso_date(args.from_date or today, "--from")
            to = iso_date(args.to_date or today, "--to")
            payments = reports.collection_detail(engines, frm, to, args.bank, args.outlet)
            emit(PAYMENT_COLUMNS, _payment_rows(payments), args.format,
                 meta={"report": "collections-detail", "from": frm.isoformat(), "to": to.isoformat(),
                       "bank": args.bank or "all", "outlet": args.outlet or "all"})
        else:
            as_of = iso_date(args.as_of or today, "--as-of")
            pages = reports.arrears_detail(engines, as_of, settings.late_fee_rates(), clock.tz, args.branch)
            emit(DETAIL_COLUMNS, _detail_rows(pages), args.format,
                 meta={"report": "arrears-detail", "as_of": as_of.isoformat(), "branch": args.branch or "all"})
    except InvalidField as err:
        print(f"report refused: {err.message}", file=sys.stderr)
        return 2
    finally:
        router.dispose()
    return 0
