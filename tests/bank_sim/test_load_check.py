"""The load test's correctness check read straight from a real MIS database
(the schema mis_adapter migrates), on SQLite, PostgreSQL and MariaDB: each
kind of discrepancy is found, and an untouched MIS passes."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa

from bank_sim import load
from bank_sim.load import PayRecord, RunLedger
from mis_adapter.db.core import Payment
from mis_adapter.migrate import upgrade
from tests.support.databases import fresh_database
from yindian_common.db import make_engine
from yindian_common.fields import make_account_no

pytestmark = pytest.mark.timeout(120)

PREFIX = "Lcheck01"
BAD = "Lcheck02"
A1, A2 = make_account_no("01", 1), make_account_no("02", 2)


def _row(serial: str, state: str, amount_fen: int, account_no: str, bank_id: str = "ICBC") -> dict[str, object]:
    return dict(bank_id=bank_id, bank_serial=serial, state=state, account_no=account_no, branch_code=account_no[:2],
                amount_fen=amount_fen, channel="COUNTER", outlet_code="LOAD01", teller_id="LOADGEN",
                settlement_date=dt.date(2026, 11, 28), posted_at=dt.datetime(2026, 11, 28, 2, tzinfo=dt.UTC),
                arrears_after_fen=0, prepaid_after_fen=0, prepaid_added_fen=0)


def _mis(url: str, rows: list[dict[str, object]]) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(Payment.__table__), rows)
    finally:
        engine.dispose()


def _ledger(prefix: str = PREFIX) -> RunLedger:
    ledger = RunLedger(prefix, "ICBC", "127.0.0.1:1")
    ledger.pays[f"{prefix}P01"] = PayRecord(A1, 1_000, "COUNTER", load.ACCEPTED, "OK")
    ledger.pays[f"{prefix}P02"] = PayRecord(A2, 2_000, "AUTO_DEBIT", load.ACCEPTED, "OK", load.CANCEL_REVERSED,
                                            f"{prefix}C01")
    ledger.pays[f"{prefix}P03"] = PayRecord(A1, 3_000, "COUNTER", load.REFUSED, "FAILED_PRECONDITION")
    return ledger


def _good_rows() -> list[dict[str, object]]:
    return [_row(f"{PREFIX}P01", "POSTED", 1_000, A1), _row(f"{PREFIX}P02", "REVERSED", 2_000, A2),
            _row(f"{PREFIX}P03", "TOMBSTONE", 3_000, A1),
            # another bank's and another run's payments are none of this check's business
            _row(f"{PREFIX}P01", "POSTED", 9_999, A1, bank_id="ABC"), _row("Lother01P01", "POSTED", 5, A1)]


def test_an_untouched_mis_passes_and_every_kind_of_discrepancy_is_reported(db_url: str) -> None:
    """One database per back end: a clean run under PREFIX, a damaged one under BAD."""
    bad = _ledger(BAD)
    bad.pays[f"{BAD}P04"] = PayRecord(A2, 4_000, "COUNTER", load.ACCEPTED, "OK")   # will be missing
    bad.pays[f"{BAD}P05"] = PayRecord(A2, 5_000, "COUNTER", load.ACCEPTED, "OK")   # wrong amount
    bad.pays[f"{BAD}P06"] = PayRecord(A2, 6_000, "COUNTER", load.ACCEPTED, "OK")   # wrong account
    bad.pays[f"{BAD}P07"] = PayRecord(A2, 7_000, "COUNTER", load.IN_DOUBT, "UNAVAILABLE")
    bad_rows = [_row(f"{BAD}P01", "REVERSED", 1_000, A1),         # accepted, never cancelled, yet reversed
                _row(f"{BAD}P02", "POSTED", 2_000, A2),           # cancelled, yet still posted
                _row(f"{BAD}P03", "POSTED", 3_000, A1),           # refused, yet posted
                _row(f"{BAD}P05", "POSTED", 5_001, A2),
                _row(f"{BAD}P06", "POSTED", 6_000, A1),
                _row(f"{BAD}P99", "POSTED", 99, A1)]              # never sent by the run
    _mis(db_url, _good_rows() + bad_rows)

    good = load.compare(_ledger(), load.read_mis([db_url], "ICBC", PREFIX), "mis-db", mis_complete=True)
    assert good.ok, good.discrepancies
    assert (good.accepted, good.accepted_fen, good.cancelled_fen, good.mis_posted_fen) == (2, 3_000, 2_000, 1_000)

    check = load.compare(bad, load.read_mis([db_url], "ICBC", BAD), "mis-db", mis_complete=True)
    found = {(d.kind, d.bank_serial) for d in check.discrepancies}
    assert found == {("WRONG_STATE", f"{BAD}P01"), ("WRONG_STATE", f"{BAD}P02"),
                     ("REFUSED_BUT_POSTED", f"{BAD}P03"), ("MISSING", f"{BAD}P04"),
                     ("WRONG_AMOUNT", f"{BAD}P05"), ("WRONG_ACCOUNT", f"{BAD}P06"),
                     ("PAY_IN_DOUBT", f"{BAD}P07"), ("UNKNOWN_POSTED", f"{BAD}P99"), ("SUM_MISMATCH", "*")}
    assert not check.ok and check.discrepancy_count == len(found)


def test_a_payment_present_in_two_branch_databases_is_a_duplicate(tmp_path: Path) -> None:
    with fresh_database("sqlite", tmp_path, "b1") as url1, fresh_database("sqlite", tmp_path, "b2") as url2:
        _mis(url1, _good_rows())
        _mis(url2, [_row(f"{PREFIX}P01", "POSTED", 1_000, A1)])
        check = load.compare(_ledger(), load.read_mis([url1, url2], "ICBC", PREFIX), "mis-db", mis_complete=True)
    assert {(d.kind, d.bank_serial) for d in check.discrepancies} == {("DUPLICATE", f"{PREFIX}P01"),
                                                                      ("SUM_MISMATCH", "*")}


def test_a_saved_ledger_reads_back_the_same(tmp_path: Path) -> None:
    ledger = _ledger()
    ledger.save(tmp_path / "l.jsonl")
    again = RunLedger.load(tmp_path / "l.jsonl")
    assert (again.prefix, again.bank_id, again.target, again.pays) == (ledger.prefix, ledger.bank_id, ledger.target,
                                                                       ledger.pays)

