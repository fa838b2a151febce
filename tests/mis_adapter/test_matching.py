"""The reconcile matcher's one decision table (mis_adapter/matching.py): the
Python `classify` and the SQL CASE expressions production runs are both
generated from it; here they are held equal on every combination of facts and
on random records, on SQLite, PostgreSQL and MariaDB, and both are held to the
rule as it was written by hand before the table (behaviour unchanged)."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from mis_adapter import matching as m
from mis_adapter import recon_outcomes, recon_staging
from mis_adapter.matching import MisPayment, StagedRecord
from yindian_common import fields
from yindian_common.db import make_engine
from yindian_common.errors import InvalidField
from yindian_common.fields import make_account_no

pytestmark = pytest.mark.timeout(120)

DAY = dt.date(2026, 11, 27)
ACCOUNTS = (make_account_no("01", 1), make_account_no("01", 2))


def hand_written_classify(bank: StagedRecord | None, mis: MisPayment | None, day: dt.date) -> tuple[str, str]:
    """The rule as recon.py wrote it by hand before the table: the reference for 'nothing changed'."""
    if bank is None:
        assert mis is not None
        return (m.UTILITY_ONLY, m.DETAIL_REVERSED_NOW) if mis.state == m.POSTED else (m.MATCHED, "")
    _line, _serial, account, amount, status = bank
    if mis is None:
        return (m.BANK_ONLY, m.DETAIL_POSTED_NOW) if status == m.BANK_POSTED else (m.MATCHED, "")
    if mis.settlement_date != day:
        return (m.MATCHED, "") if status == m.BANK_CANCELLED and mis.state != m.POSTED else (
            m.MISMATCH, m.DETAIL_OTHER_DAY)
    if mis.state == m.POSTED:
        if mis.account_no != account:
            return m.MISMATCH, m.DETAIL_ACCOUNT
        if mis.amount_fen != amount:
            return m.MISMATCH, m.DETAIL_AMOUNT
        return (m.MATCHED, "") if status == m.BANK_POSTED else (m.UTILITY_ONLY, m.DETAIL_REVERSED_NOW)
    if status == m.BANK_CANCELLED:
        return m.MATCHED, ""
    return m.MISMATCH, m.DETAIL_REVERSED if mis.state == m.REVERSED else m.DETAIL_REFUSED


def realise(f: m.Facts) -> tuple[StagedRecord | None, MisPayment | None] | None:
    """Concrete records with exactly these facts, or None when no records have them."""
    bank: StagedRecord | None = None if f.bank == m.ABSENT else (1, "S-1", ACCOUNTS[0], 100, f.bank)
    if f.mis == m.ABSENT:
        mis = None
    else:
        mis = MisPayment("S-1", ACCOUNTS[0] if f.same_account else ACCOUNTS[1], 100 if f.same_amount else 200,
                         f.mis, DAY if f.same_day else DAY - dt.timedelta(days=1))
    return (bank, mis) if m.facts_of(bank, mis, DAY) == f else None


def combinations() -> list[tuple[StagedRecord | None, MisPayment | None]]:
    return [c for f in m.every_facts() if (c := realise(f)) is not None]


# ---- the table itself ----
def test_every_combination_is_decided_and_every_rule_decides_one() -> None:
    used = set()
    for f in m.every_facts():
        outcome, _detail = m.decide(f)
        assert outcome in m.OUTCOMES
        used.add(next(i for i, r in enumerate(m.TABLE) if r.holds(f)))
    assert used == set(range(len(m.TABLE))), "a rule no combination reaches"
    assert all(set(r.when) <= set(m.DOMAIN) for r in m.TABLE)


def test_classify_is_the_hand_written_rule_on_every_combination() -> None:
    cases = combinations()
    assert len(cases) > 40
    for bank, mis in cases:
        assert m.classify(bank, mis, DAY) == hand_written_classify(bank, mis, DAY), (bank, mis)
    with pytest.raises(ValueError):
        m.classify(None, None, DAY)


def test_a_state_outside_the_domain_is_decided_like_before() -> None:
    bank: StagedRecord = (1, "S-1", ACCOUNTS[0], 100, m.BANK_POSTED)
    odd = MisPayment("S-1", ACCOUNTS[0], 100, "PENDING", DAY)
    assert m.classify(bank, odd, DAY) == hand_written_classify(bank, odd, DAY) == (m.MISMATCH, m.DETAIL_REFUSED)


def test_the_generated_sql_is_refused_for_an_unsafe_literal() -> None:
    bad = (m._rule(m.MATCHED, "it's"),)
    with pytest.raises(ValueError):
        m.sql_case({}, column="detail", table=bad)


# ---- the same table as SQL, on a real database ----
_CASES = sa.Table(
    "match_cases", sa.MetaData(),
    sa.Column("case_no", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("m_state", sa.String(10)),
    sa.Column("same_day", sa.BigInteger),
    sa.Column("m_account", sa.String(10)),
    sa.Column("account_no", sa.String(10), nullable=False),
    sa.Column("m_amount", sa.BigInteger),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
)
_BANK_SIDE = sa.text(f"SELECT j.case_no, {recon_outcomes.BANK_SIDE_OUTCOME}, {recon_outcomes.BANK_SIDE_DETAIL} "
                     "FROM match_cases j ORDER BY j.case_no")
_MIS_ONLY = sa.text(f"SELECT p.case_no, {recon_outcomes.MIS_ONLY_OUTCOME}, {recon_outcomes.MIS_ONLY_DETAIL}, "
                    f"CASE WHEN {recon_outcomes.MIS_ONLY_REPORTED} THEN 1 ELSE 0 END, "
                    f"CASE WHEN {recon_outcomes.MIS_ONLY_MATCHED} THEN 1 ELSE 0 END "
                    "FROM (SELECT case_no, m_state AS state FROM match_cases) p ORDER BY p.case_no")
# PostgreSQL's one pass decides a payment the bank did not send from the joined row `j`
_ONE_PASS_MIS_ONLY = sa.text(f"SELECT j.case_no, {recon_outcomes.ONE_PASS_MIS_ONLY_OUTCOME}, "
                             f"{recon_outcomes.ONE_PASS_MIS_ONLY_DETAIL} FROM match_cases j ORDER BY j.case_no")


def _row(n: int, bank: StagedRecord | None, mis: MisPayment | None) -> dict[str, object]:
    """One serial as the production join `j` sees it (recon_outcomes._BANK_SIDE_SQL); a serial only
    the MIS has is a row of the day's payments `p` (only `state` is read, from m_state)."""
    return {"case_no": n, "status": bank[4] if bank else "",
            "m_state": mis.state if mis else None,
            "same_day": 7 if mis and mis.settlement_date == DAY else None,
            "m_account": mis.account_no if mis else None, "account_no": bank[2] if bank else "",
            "m_amount": mis.amount_fen if mis else None, "amount_fen": bank[3] if bank else 0}


class SqlMatcher:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        _CASES.metadata.create_all(engine)

    def run(self, cases: list[tuple[StagedRecord | None, MisPayment | None]]) -> list[tuple[str, str]]:
        with self.engine.begin() as conn:
            conn.execute(_CASES.delete())
            conn.execute(_CASES.insert(), [_row(i, b, mi) for i, (b, mi) in enumerate(cases)])
            bank_side = {r[0]: (r[1], r[2]) for r in conn.execute(_BANK_SIDE)}
            mis_only = {r[0]: tuple(r[1:]) for r in conn.execute(_MIS_ONLY)}
            one_pass = {r[0]: (r[1], r[2]) for r in conn.execute(_ONE_PASS_MIS_ONLY)}
        for i, (b, _mi) in enumerate(cases):
            if b is None:  # the WHERE conditions that pick the MIS's own lines agree with the CASE
                outcome, _detail, reported, matched = mis_only[i]
                assert (reported, matched) == ((0, 1) if outcome == m.MATCHED else (1, 0)), mis_only[i]
                assert one_pass[i] == mis_only[i][:2]
        return [bank_side[i] if b is not None else mis_only[i][:2] for i, (b, _mi) in enumerate(cases)]


@pytest.fixture
def sql_matcher(db_url: str) -> Iterator[SqlMatcher]:
    engine = make_engine(db_url)
    yield SqlMatcher(engine)
    engine.dispose()


def test_generated_sql_equals_classify_on_every_combination(sql_matcher: SqlMatcher) -> None:
    cases = combinations()
    got = sql_matcher.run(cases)
    for (bank, mis), sql in zip(cases, got, strict=True):
        assert sql == m.classify(bank, mis, DAY), (bank, mis)


_serial_side = st.tuples(st.sampled_from([m.BANK_POSTED, m.BANK_CANCELLED, None]),
                         st.sampled_from([m.POSTED, m.REVERSED, m.TOMBSTONE, "PENDING", None]),
                         st.sampled_from(ACCOUNTS), st.sampled_from(ACCOUNTS),
                         st.integers(1, 3), st.integers(1, 3), st.integers(-2, 1))


def _concrete(t: tuple[str | None, str | None, str, str, int, int, int]
              ) -> tuple[StagedRecord | None, MisPayment | None]:
    status, state, b_acct, m_acct, b_amt, m_amt, days = t
    bank: StagedRecord | None = (1, "S", b_acct, b_amt, status) if status else None
    mis = MisPayment("S", m_acct, m_amt, state, DAY + dt.timedelta(days=days)) if state else None
    if bank is None and mis is None:
        bank = (1, "S", b_acct, b_amt, m.BANK_POSTED)
    if bank is None and mis is not None:  # only the MIS has it: one of the day's payments
        mis = MisPayment("S", m_acct, m_amt, mis.state, DAY)
    return bank, mis


def test_generated_sql_equals_classify_on_random_records(sql_matcher: SqlMatcher) -> None:
    @given(st.lists(_serial_side.map(_concrete), min_size=1, max_size=40))
    @settings(max_examples=40, deadline=None)
    def check(cases: list[tuple[StagedRecord | None, MisPayment | None]]) -> None:
        for (bank, mis), sql in zip(cases, sql_matcher.run(cases), strict=True):
            assert sql == m.classify(bank, mis, DAY) == hand_written_classify(bank, mis, DAY), (bank, mis)

    check()


# ---- field rules: the fast verdicts are the field rules ----
@given(st.text(alphabet="0123456789x é", min_size=0, max_size=12))
@settings(max_examples=500, deadline=None)
def test_fast_account_verdict_is_the_field_rule(account: str) -> None:
    try:
        fields.account_no(account)
        valid = True
    except InvalidField:
        valid = False
    assert fields.account_no_ok(account) == valid


@given(st.text(alphabet="AZaz09-_ é", min_size=0, max_size=34))
@settings(max_examples=300, deadline=None)
def test_fast_serial_verdict_is_the_field_rule(serial: str) -> None:
    try:
        fields.serial(serial, "s")
        valid = True
    except InvalidField:
        valid = False
    assert fields.serial_ok(serial) == valid


def test_a_bad_record_names_the_field_with_the_field_rules_message() -> None:
    good: StagedRecord = (3, "S-1", ACCOUNTS[0], 100, m.BANK_POSTED)
    recon_staging.validate_record(good, "records[3]")
    bad_digit = ACCOUNTS[0][:9] + str((int(ACCOUNTS[0][9]) + 1) % 10)
    for rec, field, message in [
        ((3, "S 1", ACCOUNTS[0], 100, "POSTED"), "records[3].bank_serial", "must be 1-32 characters"),
        ((3, "S-1", bad_digit, 100, "POSTED"), "records[3].account_no", "check digit does not match"),
        ((3, "S-1", "12345", 100, "POSTED"), "records[3].account_no", "must be 10 ASCII digits"),
        ((3, "S-1", ACCOUNTS[0], 0, "POSTED"), "records[3].amount_fen", "must be between 1 and"),
        ((3, "S-1", ACCOUNTS[0], 100, "VOID"), "records[3].status", "must be POSTED or CANCELLED"),
    ]:
        assert not recon_staging.record_ok(rec)  # type: ignore[arg-type]
        with pytest.raises(InvalidField) as err:
            recon_staging.validate_record(rec, "records[3]")  # type: ignore[arg-type]
        assert err.value.field == field and message in err.value.message


# ---- the one home of the rule ----
def test_production_statements_carry_the_generated_case() -> None:
    """What closes a day runs the CASE generated from the table, on every back end."""
    bank_side, mis_only, settled = (str(s) for s in recon_outcomes._MATCHING_IN_PLACE)
    assert recon_outcomes.BANK_SIDE_OUTCOME in bank_side and recon_outcomes.BANK_SIDE_DETAIL in bank_side
    assert recon_outcomes.MIS_ONLY_OUTCOME in mis_only and recon_outcomes.MIS_ONLY_DETAIL in mis_only
    assert recon_outcomes.MIS_ONLY_REPORTED in mis_only and recon_outcomes.MIS_ONLY_MATCHED in settled
    # PostgreSQL's one pass: both sides' CASEs, the payments the bank did not send decided by the same table
    one_pass = str(recon_outcomes._ONE_PASS)
    assert recon_outcomes.BANK_SIDE_OUTCOME in one_pass and recon_outcomes.BANK_SIDE_DETAIL in one_pass
    assert recon_outcomes.ONE_PASS_MIS_ONLY_OUTCOME in one_pass and recon_outcomes.ONE_PASS_MIS_ONLY_DETAIL in one_pass


def test_the_rule_module_is_pure() -> None:
    code = ("import sys, mis_adapter.matching; "
            "bad = {'grpc', 'google.protobuf', 'sqlalchemy', 'prometheus_client'} & set(sys.modules); "
            "print(sorted(bad)); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
