"""The seed builds a consistent utility and the banks' rosters."""
from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import sqlalchemy as sa

from mis_adapter.db.core import Agreement, BillRow, Customer, Reading
from mis_adapter.routing import BranchRouter
from mis_adapter.seed import seed
from mis_adapter.tariff import price_fen
from yindian_common.fields import account_no


def test_seed_is_consistent(db_url: str, tmp_path: Path) -> None:
    router = BranchRouter(db_url, {})
    today = dt.date(2026, 11, 28)
    counts = seed(router, 300, tmp_path / "rosters", today=today,
                  now=dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC))
    assert counts["customers"] == 300 and counts["bills"] == 300 * 12 and counts["readings"] == 300 * 13
    c, b, r, a = Customer.__table__, BillRow.__table__, Reading.__table__, Agreement.__table__
    with router.primary.connect() as conn:
        accounts = {row.account_no: row for row in conn.execute(sa.select(c))}
        for acct in accounts:
            account_no(acct)  # every generated number passes its check digit
        bills = conn.execute(sa.select(b)).all()
        for bill in bills:
            assert bill.amount_fen == price_fen(bill.kwh, accounts[bill.account_no].tariff_class)
            assert bill.status in ("PAID", "UNPAID")
            assert bill.principal_paid_fen == (bill.amount_fen if bill.status == "PAID" else 0)
        unpaid_accounts = {bill.account_no for bill in bills if bill.status != "PAID"}
        assert 0 < len(unpaid_accounts) < 300
        # prepaid credit only where nothing is unpaid
        assert all(accounts[x].prepaid_fen == 0 for x in unpaid_accounts)
        assert conn.execute(sa.select(sa.func.count()).select_from(r).where(r.c.billed.is_(False))).scalar_one() == 300
        agreements = {(row.bank_id, row.account_no) for row in conn.execute(sa.select(a))}
    rostered = set()
    for f in sorted((tmp_path / "rosters").glob("*.csv")):
        with open(f) as fh:
            rows = list(csv.DictReader(fh))
        rostered |= {(f.stem, row["account_no"]) for row in rows}
    assert rostered == agreements and len(agreements) > 100
    router.dispose()
