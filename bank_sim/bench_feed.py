"""`make bench-feed`: the bill feed end to end on SQLite and PostgreSQL.

For each back end: a fresh MIS database with N households that each have a
meter reading for one period and an auto-debit agreement at one bank, a
bank core whose passbooks cover most bills; then mis_adapter and a bridge
are started as real processes, `bank_sim autodebit` consumes the feed
through the bridge, and bills are issued. Printed per back end: bills per
second issued, delivered (first notice to last), debited at the bank,
acknowledged (cursor) and posted (payments), and the issue-to-notice
latency p50/p99 measured by a probe of small issuing transactions.

`populate_period` is also what the feed tests use to build their data."""
from __future__ import annotations

import argparse
import datetime as dt
import random
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter.db.core import Agreement, Bank, Branch, Customer, Meter, Reading
from mis_adapter.migrate import upgrade
from mis_adapter.seed import bulk_insert
from yindian_common.fields import make_account_no

BRANCH = "01"


def populate_period(engine: Engine, accounts: int, period: str, *, banks: Sequence[str] = ("ICBC",),
                    now: dt.datetime, first_serial: int = 1, rng_seed: int = 7, prepaid_share: float = 0.0,
                    agreement_share: float = 1.0, with_banks: bool = True) -> list[tuple[str, str | None]]:
    """Households with one unbilled reading in `period`, agreements spread over
    `banks`; returns (account_no, bank or None) in account order. Residential
    consumption 50-400 kWh; a `prepaid_share` of households holds some credit."""
    upgrade(engine)
    rng = random.Random(rng_seed)
    with engine.begin() as conn:
        if with_banks:
            have = set(conn.execute(sa.select(Bank.__table__.c.bank_id)).scalars())
            new_banks = [b for b in banks if b not in have]
            if new_banks:
                conn.execute(sa.insert(Bank.__table__), [{"bank_id": b, "name": b, "suspended": False,
                                                          "suspended_reason": "", "updated_at": now}
                                                         for b in new_banks])
        if conn.execute(sa.select(Branch.__table__.c.code).where(Branch.__table__.c.code == BRANCH)).first() is None:
            conn.execute(sa.insert(Branch.__table__), [{"code": BRANCH, "name": "城东供电所"}])
    customers, meters, readings, agreements = [], [], [], []
    out: list[tuple[str, str | None]] = []
    read_on = now.date()
    for i in range(accounts):
        acct = make_account_no(BRANCH, first_serial + i)
        prepaid = rng.choice((500, 3000, 100_000)) if rng.random() < prepaid_share else 0
        customers.append({"account_no": acct, "branch_code": BRANCH, "name": "户主", "address": "-", "phone": "-",
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
        bulk_insert(engine, table.__table__, rows)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim bench-feed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print("bench-feed: not built yet")
    return 1
