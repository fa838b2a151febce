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
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bank_sim import autodebit, ledger
from mis_adapter.db.core import Agreement, AllocationRow, Bank, BillRow, Branch, Customer, Meter, Payment, Reading
from mis_adapter.db.feed import DebitResultRow, FeedCursor, OutboxRow
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


def open_passbooks(engine: Engine, bank_id: str, accounts: Sequence[str], *, now: dt.datetime,
                   short_share: float = 0.1, rng_seed: int = 11) -> None:
    """A passbook per account: most hold plenty, a `short_share` hold nothing."""
    autodebit.create_schema(engine)
    rng = random.Random(rng_seed)
    rows = []
    for acct in accounts:
        bal = 0 if rng.random() < short_share else 10_000_000
        rows.append({"bank_id": bank_id, "account_no": acct, "opening_balance_fen": bal, "balance_fen": bal,
                     "opened_at": now})
    bulk_insert(engine, ledger.savings, rows)


@dataclass
class FeedCheck:
    """Both sides of the feed, counted; `problems` lists every broken invariant."""
    bills: int = 0
    fed: int = 0
    paid_by_debit: int = 0
    paid_fen: int = 0
    dunning: int = 0
    bank_debits: int = 0
    bank_debit_fen: int = 0
    bank_insufficient: int = 0
    cursor: int = 0
    problems: list[str] = field(default_factory=list)


def check_feed(mis: Engine, bank: Engine, bank_id: str, period: str) -> FeedCheck:
    """Every fed bill is paid by exactly one AUTO_DEBIT payment that matches
    one bank debit (serial, account, fen), or is in arrears for dunning with
    an INSUFFICIENT_FUNDS result on both sides; no passbook is debited twice."""
    c = FeedCheck()
    ob, bills, pay, alloc, res = (OutboxRow.__table__, BillRow.__table__, Payment.__table__,
                                  AllocationRow.__table__, DebitResultRow.__table__)
    with mis.connect() as conn:
        c.bills = conn.execute(sa.select(sa.func.count()).select_from(bills).where(bills.c.period == period)).scalar_one()
        fed = {r.seq: r for r in conn.execute(sa.select(ob).where(ob.c.bank_id == bank_id))}
        c.fed = len(fed)
        results = {r.seq: r for r in conn.execute(sa.select(res).where(res.c.bank_id == bank_id))}
        auto = {r.bank_serial: r for r in conn.execute(
            sa.select(pay).where(pay.c.bank_id == bank_id, pay.c.channel == "AUTO_DEBIT"))}
        allocs: dict[int, list[int]] = {}
        for r in conn.execute(sa.select(alloc.c.bill_id, alloc.c.payment_id)):
            allocs.setdefault(r.bill_id, []).append(r.payment_id)
        status = {r.bill_id: (r.status, r.dunning) for r in conn.execute(
            sa.select(bills.c.bill_id, bills.c.status, bills.c.dunning).where(bills.c.period == period))}
        c.cursor = int(conn.execute(sa.select(FeedCursor.__table__.c.acked_through_seq)
                                    .where(FeedCursor.__table__.c.bank_id == bank_id)).scalar_one_or_none() or 0)
    with bank.connect() as conn:
        debits = {r.bank_serial: r for r in conn.execute(
            sa.select(ledger.ledger).where(ledger.ledger.c.bank_id == bank_id, ledger.ledger.c.channel == "AUTO_DEBIT"))}
        answers = {r.seq: r for r in conn.execute(
            sa.select(autodebit.results_table).where(autodebit.results_table.c.bank_id == bank_id))}
        c.bank_debits = len(debits)
        c.bank_debit_fen = sum(r.amount_fen for r in debits.values())
        c.bank_insufficient = sum(1 for r in answers.values() if r.outcome == autodebit.INSUFFICIENT_FUNDS)
        broken = ledger.check_passbooks(conn, bank_id)
    if broken:
        c.problems.append(f"{broken} passbooks do not balance")
    if c.cursor != c.fed:
        c.problems.append(f"cursor {c.cursor} != {c.fed} notices")
    if set(auto) != set(debits):
        c.problems.append(f"{len(set(auto) ^ set(debits))} debits on one side only")
    for seq, n in fed.items():
        r = results.get(seq)
        a = answers.get(seq)
        if r is None or a is None:
            c.problems.append(f"seq {seq}: no result (mis={r is not None} bank={a is not None})")
            continue
        if (r.outcome, r.bank_serial) != (a.outcome, a.bank_serial):
            c.problems.append(f"seq {seq}: results differ")
        if r.outcome == autodebit.DEBITED:
            p, d = auto.get(r.bank_serial), debits.get(r.bank_serial)
            if p is None or d is None or (p.account_no, p.amount_fen) != (d.account_no, d.amount_fen) \
                    or p.amount_fen != n.amount_fen or p.account_no != n.account_no:
                c.problems.append(f"seq {seq}: payment and debit do not match")
                continue
            if status[n.bill_id][0] != "PAID" or allocs.get(n.bill_id) != [p.payment_id]:
                c.problems.append(f"seq {seq}: bill {n.bill_id} not paid by exactly its debit")
            c.paid_by_debit += 1
            c.paid_fen += p.amount_fen
        else:
            if status[n.bill_id] != ("UNPAID", True):
                c.problems.append(f"seq {seq}: bill {n.bill_id} not in arrears for dunning")
            c.dunning += 1
    if c.paid_by_debit != c.bank_debits or c.paid_fen != c.bank_debit_fen or c.dunning != c.bank_insufficient:
        c.problems.append("counts or fen differ between the utility and the bank")
    return c


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim bench-feed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print("bench-feed: not built yet")
    return 1
