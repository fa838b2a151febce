"""The seed builds a consistent utility and the banks' rosters."""
from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from mis_adapter import seed as seed_module
from mis_adapter.db.base import table_of
from mis_adapter.db.core import Agreement, BillRow, Customer, PrepaidEntry, Reading
from mis_adapter.issue_bills import issue_bills
from mis_adapter.migrate import upgrade
from mis_adapter.routing import BranchRouter
from mis_adapter.seed import deferred_keys, seed
from mis_adapter.tariff import price_fen
from tests.support.databases import fresh_database
from yindian_common.clock import ManualClock
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


def _keys(conn: sa.Connection) -> set[tuple[str, str, str]]:
    """Every index and constraint of the seeded tables, as PostgreSQL defines them."""
    idx = conn.exec_driver_sql("SELECT tablename, indexname, indexdef FROM pg_indexes "
                               "WHERE schemaname = current_schema()").all()
    cons = conn.exec_driver_sql("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                                "FROM pg_constraint WHERE connamespace = current_schema()::regnamespace").all()
    return {tuple(r) for r in idx} | {tuple(r) for r in cons}  # type: ignore[misc]


@contextmanager
def _migrated_postgresql(tmp_path: Path, name: str) -> Iterator[tuple[BranchRouter, set[tuple[str, str, str]]]]:
    """A fresh PostgreSQL database, migrated: its router and the keys and indexes the migrations made."""
    with fresh_database("postgresql", tmp_path, name) as url:
        router = BranchRouter(url, {})
        upgrade(router.primary)
        with router.primary.connect() as conn:
            migrated = _keys(conn)
        try:
            yield router, migrated
        finally:
            router.dispose()


@pytest.mark.timeout(120)
def test_seed_rebuilds_every_key_it_deferred_even_after_a_failure(tmp_path: Path) -> None:
    """PostgreSQL: the bulk load drops the seeded tables' secondary indexes and
    unique/foreign keys and builds them after; the schema ends exactly as the
    migrations made it, also when the load fails half way, and the keys hold."""
    with _migrated_postgresql(tmp_path, "seedkeys") as (router, migrated):
        engine = router.primary
        with pytest.raises(RuntimeError, match="load failed"), deferred_keys(engine):
            with engine.connect() as conn:
                assert _keys(conn) < migrated, "indexes and keys are dropped during the load"
            raise RuntimeError("load failed")
        with engine.connect() as conn:
            assert _keys(conn) == migrated
        seed(router, 120, tmp_path / "rosters", today=dt.date(2026, 11, 28),
             now=dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC))
        with engine.connect() as conn:
            assert _keys(conn) == migrated
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:  # the unique key is back
            conn.execute(sa.insert(BillRow.__table__).from_select(
                [c.name for c in BillRow.__table__.c if c.name != "bill_id"],
                sa.select(*[c for c in BillRow.__table__.c if c.name != "bill_id"]).limit(1)))


def test_rows_written_after_the_seed_take_the_next_ids(db_url: str, tmp_path: Path) -> None:
    """The seed numbers readings, bills and prepaid entries itself on
    PostgreSQL: afterwards the database goes on from the last of them, so
    issuing the unbilled month and recording a new reading work (no key
    clash) and number after the seeded rows, with no id skipped."""
    router = BranchRouter(db_url, {})
    engine = router.primary
    now = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)
    seed(router, 300, tmp_path / "rosters", today=now.date(), now=now)
    b, r, p = table_of(BillRow), table_of(Reading), table_of(PrepaidEntry)
    with engine.connect() as conn:
        seeded = {t.name: conn.execute(sa.select(t.c[col])).scalars().all()
                  for t, col in ((b, "bill_id"), (r, "reading_id"), (p, "entry_id"))}
    for name, ids in seeded.items():
        assert sorted(ids) == list(range(1, len(ids) + 1)), name
    summary = issue_bills(engine, ManualClock(now), "202611")
    assert summary.bills == 300 and summary.prepaid_applied_fen > 0
    with engine.begin() as conn:
        new_bills = conn.execute(sa.select(b.c.bill_id).where(b.c.period == "202611")).scalars().all()
        applied = conn.execute(sa.select(p.c.entry_id).where(p.c.reason == "BILL_APPLIED")).scalars().all()
        reading_id = conn.execute(r.insert().values(
            meter_no=conn.execute(sa.select(r.c.meter_no).limit(1)).scalar_one(), account_no="x", period="202612",
            register_kwh=1, kwh=1, read_on=dt.date(2026, 12, 31), billed=False).returning(r.c.reading_id)).scalar_one()
    assert sorted(new_bills) == list(range(len(seeded["bills"]) + 1, len(seeded["bills"]) + 301))
    assert sorted(applied) == list(range(len(seeded["prepaid_ledger"]) + 1,
                                         len(seeded["prepaid_ledger"]) + len(applied) + 1))
    assert reading_id == len(seeded["readings"]) + 1
    router.dispose()


@pytest.mark.timeout(120)
def test_a_failed_side_load_fails_the_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL loads readings and bills on a second connection (seed.SIDE_TABLES): a COPY
    failing there fails the seed with its error (no seed that reports success with bills
    missing), and the deferred keys are still rebuilt."""
    real_insert = seed_module.bulk_insert_rows
    copied: list[str] = []

    def insert_failing_on_bills(engine: sa.Engine, table: sa.Table, cols: tuple[str, ...],
                                rows: list[tuple[object, ...]]) -> None:
        if table.name == "bills" and copied.count("bills") == 1:  # the second chunk's bills
            raise RuntimeError("bills COPY failed")
        copied.append(table.name)
        real_insert(engine, table, cols, rows)

    monkeypatch.setattr(seed_module, "HOUSEHOLDS_PER_CHUNK", 50)
    monkeypatch.setattr(seed_module, "bulk_insert_rows", insert_failing_on_bills)
    with _migrated_postgresql(tmp_path, "seedside") as (router, migrated):
        engine = router.primary
        with pytest.raises(RuntimeError, match="bills COPY failed"):
            seed(router, 200, tmp_path / "rosters", today=dt.date(2026, 11, 28),
                 now=dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC))
        with engine.connect() as conn:
            assert _keys(conn) == migrated
            assert conn.execute(sa.select(sa.func.count()).select_from(BillRow.__table__)).scalar_one() == 12 * 50
