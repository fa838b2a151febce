"""The bank core's ledger on SQLite, PostgreSQL and MariaDB: passbooks from a
roster, debits and their ledger rows as one transaction, each state move at
most once, and the passbook invariant."""
from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bank_sim import ledger
from yindian_common.db import make_engine
from yindian_common.fields import make_account_no

pytestmark = pytest.mark.timeout(120)

BANK = "ICBC"
NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)
DAY = dt.date(2026, 11, 28)


def write_roster(path: Path, accounts: list[str]) -> Path:
    path.write_text("account_no,signed_on\n" + "".join(f"{a},2026-01-01\n" for a in accounts), encoding="utf-8")
    return path


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url, pool_size=8)
    ledger.create_schema(eng)
    yield eng
    eng.dispose()


def open_passbook(engine: Engine, account: str, balance_fen: int) -> None:
    with engine.begin() as conn:
        conn.execute(ledger.savings.insert(), {"bank_id": BANK, "account_no": account, "opening_balance_fen": balance_fen,
                                               "balance_fen": balance_fen, "opened_at": NOW})


def debit(conn: sa.Connection, serial: str, account: str, amount_fen: int) -> int:
    return ledger.debit_for_pay(conn, bank_id=BANK, bank_serial=serial, account_no=account, amount_fen=amount_fen,
                                channel="COUNTER", outlet_code="OUT001", teller_id="TLR00101", now=NOW)


def test_roster_loads_once_with_a_share_of_low_balances(engine: Engine, tmp_path: Path) -> None:
    accounts = [make_account_no("11", i) for i in range(1, 401)]
    roster = ledger.read_roster(write_roster(tmp_path / "ICBC.csv", accounts + accounts[:5]))
    assert roster == accounts
    with engine.begin() as conn:
        assert ledger.load_passbooks(conn, BANK, roster, rng=random.Random(1), low_balance_ratio=0.2, now=NOW) == 400
    with engine.begin() as conn:
        assert ledger.load_passbooks(conn, BANK, roster, rng=random.Random(2), low_balance_ratio=0.2, now=NOW) == 0
    with engine.connect() as conn:
        balances = list(conn.execute(sa.select(ledger.savings.c.balance_fen)).scalars())
    assert len(balances) == 400
    low = sum(b <= ledger.LOW_BALANCE_MAX_FEN for b in balances)
    assert 40 <= low <= 130
    assert all(b >= 0 for b in balances)


def test_roster_with_a_bad_account_number_is_refused_with_its_line(tmp_path: Path) -> None:
    good = make_account_no("11", 1)
    bad = good[:9] + str((int(good[9]) + 1) % 10)
    with pytest.raises(ValueError, match="line 3"):
        ledger.read_roster(write_roster(tmp_path / "x.csv", [good, bad]))
    (tmp_path / "y.csv").write_text("acct\n123\n", encoding="utf-8")
    with pytest.raises(ValueError, match="account_no column"):
        ledger.read_roster(tmp_path / "y.csv")


def test_debit_and_ledger_row_are_one_transaction(engine: Engine) -> None:
    account = make_account_no("11", 7)
    open_passbook(engine, account, 10_000)
    with engine.begin() as conn:
        assert debit(conn, "S1", account, 6_000) == 4_000
    with pytest.raises(ledger.InsufficientFunds), engine.begin() as conn:
        debit(conn, "S2", account, 4_001)
    with pytest.raises(ledger.SerialUsed), engine.begin() as conn:
        debit(conn, "S1", account, 1)
    with pytest.raises(ledger.PassbookNotFound), engine.begin() as conn:
        debit(conn, "S3", make_account_no("11", 8), 1)
    # a debit whose transaction rolls back leaves neither the debit nor the row
    with pytest.raises(RuntimeError), engine.begin() as conn:
        debit(conn, "S4", account, 1_000)
        raise RuntimeError("crash before commit")
    with engine.connect() as conn:
        assert ledger.balance_fen(conn, BANK, account) == 4_000
        assert ledger.row(conn, BANK, "S4") is None
        assert ledger.row(conn, BANK, "S2") is None
        assert ledger.totals_by_status(conn, BANK)[ledger.PENDING].amount_fen == 6_000
        assert ledger.check_passbooks(conn, BANK) == 0


def test_each_state_move_happens_once_and_gives_money_back_once(engine: Engine) -> None:
    account = make_account_no("12", 3)
    open_passbook(engine, account, 50_000)
    with engine.begin() as conn:
        debit(conn, "P1", account, 10_000)
        debit(conn, "P2", account, 20_000)
    with engine.begin() as conn:
        assert ledger.mark_failed(conn, bank_id=BANK, bank_serial="P1", reason="NOT_FOUND", now=NOW)
        assert not ledger.mark_failed(conn, bank_id=BANK, bank_serial="P1", reason="NOT_FOUND", now=NOW)
        assert not ledger.mark_posted(conn, bank_id=BANK, bank_serial="P1", settlement_date=DAY, receipt_no="R",
                                      payment_id="1", now=NOW)
        assert ledger.mark_posted(conn, bank_id=BANK, bank_serial="P2", settlement_date=DAY, receipt_no="R2",
                                  payment_id="2", now=NOW)
        assert not ledger.mark_failed(conn, bank_id=BANK, bank_serial="P2", reason="late", now=NOW)
    with engine.connect() as conn:
        assert ledger.balance_fen(conn, BANK, account) == 30_000
        assert [r.bank_serial for r in ledger.day_records(conn, BANK, DAY)] == ["P2"]
    with engine.begin() as conn:
        assert ledger.request_cancel(conn, bank_id=BANK, bank_serial="P2", cancel_serial="C2", now=NOW)
        assert not ledger.request_cancel(conn, bank_id=BANK, bank_serial="P2", cancel_serial="C3", now=NOW)
        assert [r.cancel_serial for r in ledger.pending_cancels(conn, BANK, 10)] == ["C2"]
        assert ledger.mark_cancelled(conn, bank_id=BANK, bank_serial="P2", cancel_date=DAY, now=NOW)
        assert not ledger.mark_cancelled(conn, bank_id=BANK, bank_serial="P2", cancel_date=DAY, now=NOW)
        assert not ledger.mark_cancel_refused(conn, bank_id=BANK, bank_serial="P2", reason="late", now=NOW)
        assert ledger.pending_cancels(conn, BANK, 10) == []
    with engine.connect() as conn:
        assert ledger.balance_fen(conn, BANK, account) == 50_000
        rows = list(ledger.day_records(conn, BANK, DAY))
        assert [(r.bank_serial, r.status, r.cancel_serial) for r in rows] == [("P2", ledger.CANCELLED, "C2")]
        totals = ledger.totals_by_status(conn, BANK, "P")
        assert {s: (t.count, t.amount_fen) for s, t in totals.items()} == {
            ledger.FAILED: (1, 10_000), ledger.CANCELLED: (1, 20_000)}
        assert ledger.check_passbooks(conn, BANK) == 0


def test_concurrent_debits_never_overdraw(engine: Engine) -> None:
    account = make_account_no("13", 1)
    open_passbook(engine, account, 10_000)
    refused: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for k in range(5):
            try:
                with engine.begin() as conn:
                    debit(conn, f"W{n}-{k}", account, 700)
            except ledger.InsufficientFunds:
                with lock:
                    refused.append(f"W{n}-{k}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    with engine.connect() as conn:
        # 10,000 fen covers 14 debits of 700; the other 16 of the 30 are refused.
        assert ledger.balance_fen(conn, BANK, account) == 10_000 - 14 * 700
        assert ledger.totals_by_status(conn, BANK)[ledger.PENDING].count == 14
        assert ledger.check_passbooks(conn, BANK) == 0
    assert len(refused) == 16


def test_outlets_and_tellers_are_created_once(engine: Engine) -> None:
    with engine.begin() as conn:
        pairs = ledger.ensure_outlets(conn, BANK, 3, 2)
    with engine.begin() as conn:
        again = ledger.ensure_outlets(conn, BANK, 3, 2)
    assert pairs == again
    assert len(pairs) == 6 and len({o for o, _ in pairs}) == 3
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger.tellers)).scalar_one() == 6


def test_a_refused_cancel_leaves_the_pay_posted(engine: Engine) -> None:
    account = make_account_no("14", 2)
    open_passbook(engine, account, 9_000)
    with engine.begin() as conn:
        debit(conn, "R1", account, 5_000)
        ledger.mark_posted(conn, bank_id=BANK, bank_serial="R1", settlement_date=DAY, receipt_no="X", payment_id="9",
                           now=NOW)
        ledger.request_cancel(conn, bank_id=BANK, bank_serial="R1", cancel_serial="RC1", now=NOW)
        assert ledger.mark_cancel_refused(conn, bank_id=BANK, bank_serial="R1", reason="cancel FAILED_PRECONDITION",
                                          now=NOW)
    with engine.connect() as conn:
        assert ledger.pending_cancels(conn, BANK, 10) == []
        assert ledger.row(conn, BANK, "R1").status == ledger.POSTED  # type: ignore[union-attr]
        assert ledger.balance_fen(conn, BANK, account) == 4_000
        assert ledger.check_passbooks(conn, BANK) == 0
