"""`python -m bank_sim load`: flags, the run or a re-check of a saved ledger, tables and JSON."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError
from rich.console import Console

from bank_sim.ledger import read_roster
from bank_sim.load.check import RunLedger
from bank_sim.load.profile import CONSOLE_WIDTH_MIN, DESCRIPTION, LoadProfile, check_target_allowed
from bank_sim.load.report import print_check, result_tables
from bank_sim.load.run import check_ledger, run_load_async
from yindian_common.settings import add_settings_flags, load_settings

# ---- command line ----

CUSTOM_FLAGS = frozenset({"rate_per_s", "duration_s", "warmup_s", "mix", "allow_host", "mis_db"})


def parse(argv: list[str]) -> tuple[LoadProfile, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bank_sim load", description=DESCRIPTION)
    parser.add_argument("--rate", dest="rate_per_s", type=float, default=None, help="offered arrivals per second")
    parser.add_argument("--duration", dest="duration_s", type=float, default=None, help="measured seconds")
    parser.add_argument("--warmup", dest="warmup_s", type=float, default=None, help="unmeasured warm-up seconds")
    parser.add_argument("--mix", default=None,
                        help="shares of query/pay/cancel/autodebit, e.g. query=50,pay=35,cancel=5,autodebit=10 "
                             "(autodebit = Pay on the AUTO_DEBIT channel; cancel reverses an earlier pay of the run)")
    parser.add_argument("--allow-host", dest="allow_host", action="append", default=None,
                        help="a non-loopback host the load may target (repeatable)")
    parser.add_argument("--mis-db", dest="mis_db", action="append", default=None,
                        help="MIS database URL for the check (repeatable: one per branch database)")
    parser.add_argument("--json", dest="json_out", nargs="?", const="-", default=None,
                        help="write the result as JSON to FILE, or to stdout (tables then go to stderr)")
    parser.add_argument("--save-ledger", default=None, help="write the run's pays (JSON lines) here")
    parser.add_argument("--check-ledger", default=None,
                        help="send no load: re-check a saved ledger against --mis-db (or GetPayment via --target)")
    add_settings_flags(parser, LoadProfile, skip=CUSTOM_FLAGS)
    args = parser.parse_args(argv)
    return load_settings(LoadProfile, args, args.config_file), args


def _console(*, stderr: bool) -> Console:
    """Wide enough for the latency table even when piped."""
    return Console(stderr=stderr, width=max(Console(stderr=stderr).width, CONSOLE_WIDTH_MIN))


def _write_json(target: str, payload: dict[str, Any], out: TextIO) -> None:
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    if target == "-":
        out.write(text + "\n")
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    try:
        profile, args = parse(argv)
    except ValidationError as exc:
        for e in exc.errors():
            print(f"error: {'.'.join(str(x) for x in e['loc']) or 'profile'}: {e['msg']}", file=sys.stderr)
        return 2
    console = _console(stderr=args.json_out == "-")
    if args.check_ledger:
        ledger = RunLedger.load(args.check_ledger)
        check = check_ledger(profile, ledger)
        print_check(console, check)
        if args.json_out:
            _write_json(args.json_out, check.to_json(), sys.stdout)
        return 0 if check.ok else 1
    check_target_allowed(profile.target, profile.allow_host)
    if not profile.roster:
        print("error: --roster is required (the bank's roster CSV)", file=sys.stderr)
        return 2
    try:
        accounts = read_roster(profile.roster)
    except (OSError, ValueError) as exc:
        print(f"error: --roster: {exc}", file=sys.stderr)
        return 2
    result, ledger = asyncio.run(run_load_async(profile, accounts, console=_console(stderr=True)))
    for table in result_tables(result):
        console.print(table)
    if result.check is not None:
        print_check(console, result.check)
    if args.save_ledger:
        ledger.save(args.save_ledger)
    if args.json_out:
        _write_json(args.json_out, result.to_json(), sys.stdout)
    return 0 if result.check is None or result.check.ok else 1
