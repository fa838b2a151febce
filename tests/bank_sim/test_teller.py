"""Teller sessions against a real mis_adapter process (seeded SQLite MIS),
with the bank's ledger on SQLite, PostgreSQL and MariaDB, through a link
that loses answers, fails calls and refuses some: every pay the bank
recorded as posted is in the MIS exactly once, every cancelled one is
reversed there, refused ones are absent and their money is back in the
passbook, and retries always reuse the serial."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from bank_sim import ledger, teller
from bank_sim.settings import TellerSettings
from tests.bank_sim.faulty_link import Fault, FaultyLink, Rule
from tests.support.databases import migrated_sqlite
from tests.support.procs import REPO, Proc, start
from yindian_common.clock import make_clock
from yindian_common.db import make_engine
from yindian_common.settings import load_settings

pytestmark = pytest.mark.timeout(180)

BANK = "ICBC"


# ---- pure rules ----

def test_amount_is_arrears_plus_deposit_rounded_up_to_the_step() -> None:
    assert teller.amount_with_deposit_fen(12_345, 1_000) == 13_000
    assert teller.amount_with_deposit_fen(12_345, 5_000) == 15_000
    assert teller.amount_with_deposit_fen(15_000, 5_000) == 20_000  # always some deposit
    assert teller.amount_with_deposit_fen(0, 1_000) == 1_000  # owes nothing: deposits one step


def test_amount_falls_back_to_arrears_then_to_nothing() -> None:
    assert teller.choose_amount_fen(12_345, 20_000, 5_000) == 15_000
    assert teller.choose_amount_fen(12_345, 14_000, 5_000) == 12_345
    assert teller.choose_amount_fen(12_345, 12_000, 5_000) is None
    assert teller.choose_amount_fen(0, 999, 1_000) is None


@given(due=st.integers(0, 10**9), balance=st.integers(0, 2 * 10**9), step=st.sampled_from(teller.DEPOSIT_STEPS_FEN))
def test_the_amount_settles_the_arrears_and_never_overdraws(due: int, balance: int, step: int) -> None:
    wanted = teller.amount_with_deposit_fen(due, step)
    assert wanted % step == 0 and due < wanted <= due + step
    chosen = teller.choose_amount_fen(due, balance, step)
    if chosen is None:
        assert balance < wanted and (due == 0 or balance < due)
    else:
        assert chosen <= balance and chosen in (wanted, due) and chosen >= max(due, 1)


def test_customers_are_distinct_and_planned_from_the_seed() -> None:
    accounts = [f"{i:010d}" for i in range(100)]
    a = teller.plan_customers(accounts, 40, 7, 0.5)
    assert a == teller.plan_customers(accounts, 40, 7, 0.5)
    assert len({c.account_no for c in a}) == 40
    assert 5 < sum(c.cancels for c in a) < 35
    assert len(teller.plan_customers(accounts, 500, 7, 0.0)) == 100


# ---- against the real utility ----

@dataclass
class Utility:
    proc: Proc
    mis_db: str
    roster: Path


@pytest.fixture(scope="module")
def utility(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Utility]:
    work = tmp_path_factory.mktemp("utility")
    mis_db = migrated_sqlite(work / "mis.db")
    subprocess.run([sys.executable, "-m", "mis_adapter", "seed", "--db", mis_db, "--accounts", "400",
                    "--roster-dir", str(work / "rosters")], cwd=REPO, check=True, timeout=120,
                   capture_output=True)
    proc = start("mis_adapter", ["mis_adapter", "serve", "--db", mis_db, "--listen", "127.0.0.1:0",
                                 "--metrics-port", "0", "--insecure"], log_dir=work)
    yield Utility(proc, mis_db, work / "rosters" / f"{BANK}.csv")
    assert proc.terminate() == 0


def settings_for(target: str, roster: Path, bank_db: str, **over: object) -> TellerSettings:
    values: dict[str, object] = {"target": target, "bank_id": BANK, "insecure": True, "db": bank_db,
                                 "roster": str(roster), "sessions": 4, "customers": 24, "cancel_ratio": 0.25,
                                 "retry_backoff_base_s": 0.005, "retry_backoff_cap_s": 0.02,
                                 "seed": 11, "rpc_deadline_s": 10.0}
    values.update(over)
    return load_settings(TellerSettings, values)


def run(settings: TellerSettings) -> teller.TellerSummary:
    engine = make_engine(settings.db, pool_size=8)
    channel = grpc.insecure_channel(settings.target)
    try:
        return teller.run_counters(settings, engine, channel, make_clock(None))
    finally:
        channel.close()
        engine.dispose()


def mis_payments(mis_db: str, prefix: str) -> dict[str, tuple[str, int]]:
    eng = make_engine(mis_db)
    try:
        with eng.connect() as conn:
            rows = conn.execute(sa.text("SELECT bank_serial, state, amount_fen FROM payments "
                                        "WHERE bank_id = :b AND bank_serial LIKE :p"),
                                {"b": BANK, "p": prefix + "%"}).all()
    finally:
        eng.dispose()
    return {r[0]: (r[1], int(r[2])) for r in rows}


def bank_rows(bank_db: str, prefix: str) -> dict[str, tuple[str, int]]:
    eng = make_engine(bank_db)
    try:
        with eng.connect() as conn:
            rows = conn.execute(sa.select(ledger.ledger.c.bank_serial, ledger.ledger.c.status,
                                          ledger.ledger.c.amount_fen)
                                .where(ledger.ledger.c.bank_serial.startswith(prefix))).all()
    finally:
        eng.dispose()
    return {r[0]: (r[1], int(r[2])) for r in rows}


def assert_books_agree(bank: dict[str, tuple[str, int]], mis: dict[str, tuple[str, int]]) -> None:
    expected_mis_state = {ledger.POSTED: "POSTED", ledger.CANCELLED: "REVERSED"}
    for serial, (status, amount) in bank.items():
        assert status != ledger.PENDING, f"{serial} still in doubt"
        if status == ledger.FAILED:
            assert serial not in mis or mis[serial][0] != "POSTED"
        else:
            assert mis[serial] == (expected_mis_state[status], amount)
    assert set(mis) <= set(bank)


def lossy(rpc: str, serial: str, attempt: int) -> Fault:
    """Pays: every third loses its first answer, every fifth fails its first two attempts
    before reaching the utility; every cancel loses its first answer."""
    number = int(serial[-3:]) if serial[-3:].isdigit() else 0
    if rpc == "Pay" and number % 3 == 0 and attempt == 1:
        return Fault.LOSE_ANSWER
    if rpc == "Pay" and number % 5 == 1 and attempt <= 2:
        return Fault.UNAVAILABLE_BEFORE
    if rpc == "Cancel" and attempt == 1:
        return Fault.LOSE_ANSWER
    return Fault.PASS


def test_a_lossy_link_applies_every_pay_once(utility: Utility, db_url: str) -> None:
    with FaultyLink(utility.proc.grpc_addr, lossy) as link:
        summary = run(settings_for(link.address, utility.roster, db_url))
    assert link.faults[Fault.LOSE_ANSWER] > 0 and link.faults[Fault.UNAVAILABLE_BEFORE] > 0
    assert summary.requests["Pay"]["UNAVAILABLE"] > 0
    assert summary.customers.get("paid", 0) > 0 and summary.customers.get("cancelled", 0) > 0
    bank = bank_rows(db_url, summary.serial_prefix)
    mis = mis_payments(utility.mis_db, summary.serial_prefix)
    assert_books_agree(bank, mis)
    assert summary.net_posted_fen == sum(a for s, a in mis.values() if s == "POSTED")
    assert summary.cancelled_fen == sum(a for s, a in mis.values() if s == "REVERSED")
    assert summary.passbooks_broken == 0
    # every retry reused its serial: the link saw no more distinct pay serials than the ledger has rows
    assert {s for (rpc, s) in link.attempts if rpc == "Pay"} == set(bank)


def test_a_definite_refusal_gives_the_money_back(utility: Utility, sqlite_url: str) -> None:
    def refuse_odd(rpc: str, serial: str, attempt: int) -> Fault:
        return Fault.REFUSE if rpc == "Pay" and int(serial[-1]) % 2 == 1 else Fault.PASS

    with FaultyLink(utility.proc.grpc_addr, refuse_odd) as link:
        summary = run(settings_for(link.address, utility.roster, sqlite_url, cancel_ratio=0.0, seed=12))
    assert summary.customers.get("pay_invalid_argument", 0) > 0
    bank = bank_rows(sqlite_url, summary.serial_prefix)
    failed = {s for s, (st, _) in bank.items() if st == ledger.FAILED}
    assert failed and all(int(s[-1]) % 2 == 1 for s in failed)
    mis = mis_payments(utility.mis_db, summary.serial_prefix)
    assert not failed & set(mis)
    assert_books_agree(bank, mis)
    assert summary.passbooks_broken == 0  # refused debits are back in the passbooks
    assert all(a == 1 for (rpc, _), a in link.attempts.items() if rpc == "Pay")  # definite: never retried


def test_pays_in_doubt_after_the_last_attempt_are_settled_by_the_same_serial(utility: Utility,
                                                                              sqlite_url: str) -> None:
    down_for_two: Rule = lambda rpc, serial, attempt: (  # noqa: E731
        Fault.UNAVAILABLE_BEFORE if rpc == "Pay" and attempt <= 2 else Fault.PASS)
    with FaultyLink(utility.proc.grpc_addr, down_for_two) as link:
        summary = run(settings_for(link.address, utility.roster, sqlite_url, cancel_ratio=0.0, seed=13,
                                   retry_max_attempts=2, customers=10))
    in_doubt = summary.customers.get("pay_in_doubt", 0)
    assert in_doubt > 0 and summary.customers.get("resolved_paid", 0) == in_doubt
    bank = bank_rows(sqlite_url, summary.serial_prefix)
    assert all(st == ledger.POSTED for st, _ in bank.values())
    assert_books_agree(bank, mis_payments(utility.mis_db, summary.serial_prefix))
    assert all(a == 3 for (rpc, _), a in link.attempts.items() if rpc == "Pay")


def test_cancels_in_doubt_after_the_last_attempt_are_settled_by_the_same_serial(utility: Utility,
                                                                                 sqlite_url: str) -> None:
    def cancels_down_for_two(rpc: str, serial: str, attempt: int) -> Fault:
        return Fault.LOSE_ANSWER if rpc == "Cancel" and attempt <= 2 else Fault.PASS

    with FaultyLink(utility.proc.grpc_addr, cancels_down_for_two) as link:
        summary = run(settings_for(link.address, utility.roster, sqlite_url, cancel_ratio=1.0, seed=15,
                                   retry_max_attempts=2, customers=8))
    in_doubt = summary.customers.get("paid_cancel_in_doubt", 0)
    assert in_doubt > 0 and summary.customers.get("resolved_cancelled", 0) == in_doubt
    assert summary.cancels_in_doubt == 0
    bank = bank_rows(sqlite_url, summary.serial_prefix)
    assert bank and all(st == ledger.CANCELLED for st, _ in bank.values())
    assert_books_agree(bank, mis_payments(utility.mis_db, summary.serial_prefix))
    assert all(a == 3 for (rpc, _), a in link.attempts.items() if rpc == "Cancel")


def test_a_suspended_bank_is_refused_at_once_and_the_money_stays_in_the_passbooks(utility: Utility,
                                                                                    sqlite_url: str) -> None:
    """停工: UNAVAILABLE saying the bank is suspended is definite (nothing written), not in doubt.
    (Another bank than the other tests', so its suspension cannot leak into them.)"""
    other = "ABC"

    def operator(action: str) -> None:
        subprocess.run([sys.executable, "-m", "mis_adapter", "bank", action, other, "--db", utility.mis_db],
                       cwd=REPO, check=True, timeout=60, capture_output=True)

    operator("suspend")
    try:
        summary = run(settings_for(utility.proc.grpc_addr, utility.roster.with_name(f"{other}.csv"), sqlite_url,
                                   bank_id=other, customers=6, cancel_ratio=0.0, seed=17,
                                   retry_backoff_base_s=0.2, retry_backoff_cap_s=0.5))
    finally:
        operator("resume")
    assert summary.requests["QueryAccount"] == {"OK": 6}  # queries still answer
    refused = summary.customers.get("pay_unavailable", 0)
    assert refused > 0 and refused + summary.customers.get("insufficient_funds", 0) == 6
    # the suspension's TTL may let the first pay through; after that each refusal is final on its first attempt
    assert summary.requests["Pay"].get("UNAVAILABLE", 0) == refused
    bank = bank_rows(sqlite_url, summary.serial_prefix)
    assert sorted(st for st, _ in bank.values()) == [ledger.FAILED] * refused
    assert mis_payments(utility.mis_db, summary.serial_prefix) == {}
    assert summary.passbooks_broken == 0


@pytest.fixture(scope="module")
def bridge(utility: Utility, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    work = tmp_path_factory.mktemp("bridge")
    proc = start("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", utility.proc.grpc_addr,
                            "--db", f"sqlite:///{work / 'bridge.db'}", "--bank-id", BANK, "--metrics-port", "0",
                            "--insecure"], log_dir=work)
    yield proc
    assert proc.terminate() == 0


def test_a_pay_replayed_after_lost_answers_is_the_same_request_at_the_bridge(utility: Utility, bridge: Proc,
                                                                              sqlite_url: str) -> None:
    """The bridge refuses a serial replayed with other parameters (ALREADY_EXISTS): the end-of-run
    replay must send exactly what was sent first, the passbook balance included."""
    def answers_lost_twice(rpc: str, serial: str, attempt: int) -> Fault:
        return Fault.LOSE_ANSWER if rpc == "Pay" and attempt <= 2 else Fault.PASS

    with FaultyLink(bridge.grpc_addr, answers_lost_twice) as link:
        summary = run(settings_for(link.address, utility.roster, sqlite_url, cancel_ratio=0.0, seed=16,
                                   retry_max_attempts=2, customers=6))
    in_doubt = summary.customers.get("pay_in_doubt", 0)
    assert in_doubt > 0 and summary.customers.get("resolved_paid", 0) == in_doubt
    bank = bank_rows(sqlite_url, summary.serial_prefix)
    assert bank and all(st == ledger.POSTED for st, _ in bank.values())
    assert_books_agree(bank, mis_payments(utility.mis_db, summary.serial_prefix))


def test_settlement_date_comes_from_the_utility(utility: Utility, sqlite_url: str) -> None:
    summary = run(settings_for(utility.proc.grpc_addr, utility.roster, sqlite_url, customers=5, cancel_ratio=0.0,
                               seed=14))
    eng = make_engine(sqlite_url)
    with eng.connect() as conn:
        days = set(conn.execute(sa.select(ledger.ledger.c.settlement_date)
                                .where(ledger.ledger.c.status == ledger.POSTED)).scalars())
    eng.dispose()
    assert summary.customers.get("paid", 0) > 0
    assert len(days) == 1 and isinstance(next(iter(days)), dt.date)


def test_the_teller_command_serves_customers_and_writes_its_summary(utility: Utility, tmp_path: Path) -> None:
    summary_path = tmp_path / "teller.json"
    bank_db = f"sqlite:///{tmp_path / 'bank' / 'bank.db'}"  # the directory does not exist yet
    done = subprocess.run([sys.executable, "-m", "bank_sim", "teller", "--target", utility.proc.grpc_addr,
                           "--insecure", "--bank-id", BANK, "--roster", str(utility.roster), "--db", bank_db,
                           "--customers", "5", "--sessions", "2", "--seed", "18", "--summary-json",
                           str(summary_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Customers served" in done.stdout
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert sum(summary["customers"].values()) == 5 and summary["passbooks_broken"] == 0
    mis = mis_payments(utility.mis_db, summary["serial_prefix"])
    assert summary["net_posted_fen"] == sum(a for s, a in mis.values() if s == "POSTED")
