"""`python -m mis_adapter bench-data`: benchmark and test data on the MIS side,
so the bank simulator's feed benchmark needs nothing of mis_adapter but its CLI.

    populate  households with one unbilled reading in a period and auto-debit
              agreements at the given banks (`populate_period`, which the feed
              tests also call directly)
    issue     issue the period's bills, timed inside this process; prints one
              JSON line {"bills", "started_wall", "issued_s"}
    probe     populate `--count` probe households, then issue one bill per line
              read on stdin (the caller paces: it answers after each notice),
              printing one JSON line {"account_no", "committing_monotonic"}
              per bill, stamped just before its commit. time.monotonic() is
              the machine's CLOCK_MONOTONIC, comparable across processes."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from collections.abc import Sequence

import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.engine import Engine

from mis_adapter.db.base import table_of
from mis_adapter.db.core import Agreement, Bank, Branch, Customer, Meter, Reading
from mis_adapter.issue_bills import ISSUE_WORKERS_MAX, issue_bills
from mis_adapter.migrate import upgrade
from mis_adapter.seed import bulk_insert
from yindian_common.clock import SystemClock
from yindian_common.db import make_engine
from yindian_common.fields import make_account_no
from yindian_common.settings import YinDianSettings, add_settings_flags, load_settings

BRANCH = "01"
POPULATE_BATCH_ROWS = 20_000
ACCOUNTS_MAX = 10_000_000
PROBES_MAX = 100_000


def populate_period(engine: Engine, accounts: int, period: str, *, banks: Sequence[str] = ("ICBC",),
                    now: dt.datetime, first_serial: int = 1, rng_seed: int = 7, prepaid_share: float = 0.0,
                    agreement_share: float = 1.0, with_banks: bool = True,
                    branch: str = BRANCH) -> list[tuple[str, str | None]]:
    """Households with one unbilled reading in `period`, agreements spread over
    `banks`; returns (account_no, bank or None) in account order. Residential
    consumption 50-400 kWh; a `prepaid_share` of households holds some credit."""
    upgrade(engine)
    rng = random.Random(rng_seed)
    with engine.begin() as conn:
        if with_banks:
            have = set(conn.execute(sa.select(table_of(Bank).c.bank_id)).scalars())
            new_banks = [b for b in banks if b not in have]
            if new_banks:
                conn.execute(sa.insert(table_of(Bank)), [{"bank_id": b, "name": b, "suspended": False,
                                                          "suspended_reason": "", "updated_at": now}
                                                         for b in new_banks])
        if conn.execute(sa.select(table_of(Branch).c.code).where(table_of(Branch).c.code == branch)).first() is None:
            conn.execute(sa.insert(table_of(Branch)), [{"code": branch, "name": "城东供电所" if branch == BRANCH else f"供电所 {branch}"}])
    customers, meters, readings, agreements = [], [], [], []
    out: list[tuple[str, str | None]] = []
    read_on = now.date()
    for i in range(accounts):
        acct = make_account_no(branch, first_serial + i)
        prepaid = rng.choice((500, 3000, 100_000)) if rng.random() < prepaid_share else 0
        customers.append({"account_no": acct, "branch_code": branch, "name": "户主", "address": "-", "phone": "-",
                          "tariff_class": "RESIDENTIAL", "status": "OPEN", "prepaid_fen": prepaid,
                          "opened_on": dt.date(2020, 1, 1)})
        meters.append({"meter_no": f"M{acct}", "account_no": acct, "installed_on": dt.date(2020, 1, 1)})
        kwh = rng.randint(50, 400)
        readings.append({"meter_no": f"M{acct}", "account_no": acct, "period": period, "register_kwh": 10_000 + kwh,
                         "kwh": kwh, "read_on": read_on, "billed": False})
        bank = banks[i % len(banks)] if rng.random() < agreement_share else None
        if bank is not None:
            agreements.append({"account_no": acct, "bank_id": bank, "signed_on": dt.date(2020, 1, 1),
                               "active": True})
        out.append((acct, bank))
    for table, rows in ((Customer, customers), (Meter, meters), (Reading, readings), (Agreement, agreements)):
        for start in range(0, len(rows), POPULATE_BATCH_ROWS):
            bulk_insert(engine, table_of(table), rows[start:start + POPULATE_BATCH_ROWS])
    return out


class BenchDataSettings(YinDianSettings):
    """`python -m mis_adapter bench-data populate|issue|probe`."""

    db: str = Field("sqlite:///var/mis.db", description="SQLAlchemy URL of the MIS database")
    period: str = Field("202611", pattern=r"^\d{6}$", description="billing period YYYYMM")
    accounts: int = Field(1_000, ge=0, le=ACCOUNTS_MAX, description="populate: households")
    banks: str = Field("ICBC", description="populate: comma-separated banks the agreements are spread over")
    first_serial: int = Field(1, ge=1, le=99_999_999, description="account serial of the first household")
    branch: str = Field(BRANCH, pattern=r"^\d{2}$", description="populate: the households' branch code")
    batch_accounts: int = Field(2_000, ge=1, le=1_000_000, description="issue: accounts per transaction")
    workers: int = Field(2, ge=1, le=ISSUE_WORKERS_MAX, description="issue: batches issued at once (SQLite: one)")
    bank: str = Field("PROBE", max_length=16, description="probe: the probe households' bank")
    count: int = Field(200, ge=1, le=PROBES_MAX, description="probe: bills issued one at a time")


def _populate(s: BenchDataSettings, engine: Engine) -> None:
    banks = tuple(b.strip() for b in s.banks.split(",") if b.strip())
    people = populate_period(engine, s.accounts, s.period, banks=banks, now=SystemClock().now(),
                             first_serial=s.first_serial, branch=s.branch)
    print(json.dumps({"households": len(people), "first_account_no": people[0][0] if people else None}), flush=True)


def _issue(s: BenchDataSettings, engine: Engine) -> None:
    upgrade(engine)
    started_wall, t0 = time.time(), time.perf_counter()
    summary = issue_bills(engine, SystemClock(), s.period, batch_accounts=s.batch_accounts, workers=s.workers)
    issued_s = time.perf_counter() - t0
    print(json.dumps({"bills": summary.bills, "started_wall": started_wall, "issued_s": issued_s}), flush=True)


def _probe(s: BenchDataSettings, engine: Engine) -> None:
    clock = SystemClock()
    people = populate_period(engine, s.count, s.period, banks=(s.bank,), now=clock.now(),
                             first_serial=s.first_serial)
    print(json.dumps({"ready": len(people)}), flush=True)
    committing: list[float] = []
    for acct, _bank in people:
        if not sys.stdin.readline():  # the caller is gone or done
            break
        issue_bills(engine, clock, s.period, accounts=[acct],
                    before_commit=lambda _batch: committing.append(time.monotonic()))
        print(json.dumps({"account_no": acct, "committing_monotonic": committing[-1]}), flush=True)


ACTIONS = {"populate": _populate, "issue": _issue, "probe": _probe}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mis_adapter bench-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=sorted(ACTIONS))
    add_settings_flags(parser, BenchDataSettings)
    args = parser.parse_args(argv)
    s = load_settings(BenchDataSettings, args, args.config_file)
    engine = make_engine(s.db)
    try:
        ACTIONS[args.action](s, engine)
    finally:
        engine.dispose()
    return 0
