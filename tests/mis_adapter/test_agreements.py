"""Agreements (签约/解约) on real databases: idempotency per serial, one active
agreement per account, another bank's agreement indistinguishable from none,
refusals that write nothing, paging, and what bill issuance feeds."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter import agreements as ag
from mis_adapter.db.core import Agreement, JournalEntry, Reading
from mis_adapter.db.feed import DebitResultRow, OutboxRow
from mis_adapter.db.link import AgreementRecord, FeedWithdrawal
from mis_adapter.issue_bills import issue_bills
from mis_adapter.migrate import upgrade
from tests.support.mis_data import NOON, TODAY, add_account, add_bank, row_counts
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine
from yindian_common.errors import AccountClosed, AccountNotFound, InvalidField, SerialConflict
from yindian_common.fields import make_account_no

T_REC = AgreementRecord.__table__
T_AGR = Agreement.__table__
T_OUT = OutboxRow.__table__


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    e = make_engine(db_url)
    upgrade(e)
    for b in ("ICBC", "ABC"):
        add_bank(e, b)
    yield e
    e.dispose()


def _sign(engine: Engine, bank: str, serial: str, acct: str, **kw: object) -> ag.SignResult:
    cmd = ag.SignCommand(bank, serial, acct, kw.pop("ref", f"PB-{acct}"), **kw)  # type: ignore[arg-type]
    return ag.sign(engine, cmd, TODAY, NOON)


def _end(engine: Engine, bank: str, serial: str, acct: str) -> ag.EndResult:
    return ag.end(engine, ag.EndCommand(bank, serial, acct, "customer asked"), TODAY, NOON)


@pytest.mark.timeout(120)
def test_sign_replay_conflict_and_one_active_per_account(engine: Engine) -> None:
    acct = add_account(engine, "01", 1)
    r = _sign(engine, "ICBC", "AG-1", acct, debit_limit_fen=50_000)
    assert (r.replayed, r.agreement.state, r.agreement.start_date, r.agreement.debit_limit_fen) == \
        (False, "ACTIVE", TODAY, 50_000)
    before = row_counts([engine])
    again = _sign(engine, "ICBC", "AG-1", acct, debit_limit_fen=50_000)
    assert again.replayed and again.agreement == r.agreement
    with pytest.raises(SerialConflict) as e1:
        _sign(engine, "ICBC", "AG-1", acct, debit_limit_fen=60_000)
    assert e1.value.field == "agreement_serial"
    with pytest.raises(ag.AgreementActive) as own:
        _sign(engine, "ICBC", "AG-2", acct)
    with pytest.raises(ag.AgreementActive) as other:
        _sign(engine, "ABC", "AG-1", acct)
    # Which bank holds the agreement is never said.
    assert own.value.message == other.value.message and "ICBC" not in other.value.message
    assert row_counts([engine]) == before
    with engine.connect() as conn:
        idx = conn.execute(sa.select(T_AGR)).one()
        journal = conn.execute(sa.select(JournalEntry.__table__.c.rpc, JournalEntry.__table__.c.serial)).all()
    assert (idx.bank_id, idx.active, idx.agreement_id, idx.debit_limit_fen, idx.signed_on) == \
        ("ICBC", True, r.agreement.agreement_id, 50_000, TODAY)
    assert [tuple(j) for j in journal] == [("AGREE_SIGN", "AG-1")]


@pytest.mark.timeout(120)
def test_refusals_write_nothing(engine: Engine) -> None:
    acct = add_account(engine, "01", 1)
    closed = add_account(engine, "01", 2, status="CLOSED")
    before = row_counts([engine])
    with pytest.raises(AccountNotFound):
        _sign(engine, "ICBC", "AG-1", make_account_no("01", 9_999_999))
    with pytest.raises(AccountClosed):
        _sign(engine, "ICBC", "AG-2", closed)
    for kw, field in (({"serial": "bad serial"}, "agreement_serial"), ({"acct": "0100000010"}, "account_no"),
                      ({"ref": ""}, "savings_account_ref"), ({"debit_limit_fen": 0}, "debit_limit_fen"),
                      ({"start_date": TODAY - dt.timedelta(days=1)}, "start_date"),
                      ({"start_date": TODAY + dt.timedelta(days=400)}, "start_date")):
        serial = str(kw.pop("serial", "AG-3"))
        a = str(kw.pop("acct", acct))
        with pytest.raises(InvalidField) as e:
            _sign(engine, "ICBC", serial, a, **kw)
        assert e.value.field == field
    with pytest.raises(InvalidField) as e2:
        ag.end(engine, ag.EndCommand("ICBC", "E-1", acct, "x" * 129), TODAY, NOON)
    assert e2.value.field == "reason"
    assert row_counts([engine]) == before


@pytest.mark.timeout(120)
def test_end_is_the_signing_banks_alone_and_idempotent(engine: Engine) -> None:
    acct = add_account(engine, "01", 1)
    signed = _sign(engine, "ICBC", "AG-1", acct)
    before = row_counts([engine])
    with pytest.raises(ag.AgreementNotFound) as other:
        _end(engine, "ABC", "E-1", acct)
    nobody = add_account(engine, "01", 2)
    before = row_counts([engine])
    with pytest.raises(ag.AgreementNotFound) as absent:
        _end(engine, "ABC", "E-1", nobody)
    assert (other.value.code, other.value.reason) == (absent.value.code, absent.value.reason) == \
        ("NOT_FOUND", "AGREEMENT_NOT_FOUND")
    assert other.value.message.replace(acct, "") == absent.value.message.replace(nobody, "")
    assert row_counts([engine]) == before
    ended = _end(engine, "ICBC", "E-1", acct)
    assert (ended.replayed, ended.agreement.state, ended.agreement.end_date, ended.agreement.end_serial) == \
        (False, "ENDED", TODAY, "E-1")
    assert ended.agreement.agreement_id == signed.agreement.agreement_id
    after = row_counts([engine])
    again = _end(engine, "ICBC", "E-1", acct)
    assert again.replayed and again.agreement == ended.agreement
    with pytest.raises(SerialConflict):
        _end(engine, "ICBC", "E-1", nobody)
    with pytest.raises(ag.AgreementNotFound):
        _end(engine, "ICBC", "E-2", acct)   # ended already: nothing active to end
    assert row_counts([engine]) == after
    # The account is free again: another bank may sign it; the history keeps both.
    resigned = _sign(engine, "ABC", "AG-9", acct)
    assert resigned.agreement.state == "ACTIVE"
    with engine.connect() as conn:
        idx = conn.execute(sa.select(T_AGR)).one()
        states = sorted(conn.execute(sa.select(T_REC.c.bank_id, T_REC.c.state)).all())
    assert (idx.bank_id, idx.active, idx.agreement_id) == ("ABC", True, resigned.agreement.agreement_id)
    assert [tuple(s) for s in states] == [("ABC", "ACTIVE"), ("ICBC", "ENDED")]


@pytest.mark.timeout(120)
def test_list_pages_only_the_callers_agreements(engine: Engine) -> None:
    accts = [add_account(engine, "01", i) for i in range(1, 8)]
    for i, a in enumerate(accts[:5]):
        _sign(engine, "ICBC", f"AG-{i}", a)
    for i, a in enumerate(accts[5:]):
        _sign(engine, "ABC", f"AG-{i}", a)
    _end(engine, "ICBC", "E-1", accts[0])
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = ag.list_agreements([engine], "ICBC", page_size=2, page_token=token)
        pages += 1
        seen += [a.account_no for a in page.agreements]
        assert all(a.bank_id == "ICBC" for a in page.agreements)
        token = page.next_page_token
        if not token:
            break
    assert seen == accts[:5] and pages == 3
    active = ag.list_agreements([engine], "ICBC", page_size=0, active_only=True)
    assert [a.account_no for a in active.agreements] == accts[1:5] and active.next_page_token == ""
    assert ag.list_agreements([engine], "ABC", page_size=10, account_no=accts[0]).agreements == []
    for bad, field in (({"page_size": 501}, "page_size"), ({"page_token": "x"}, "page_token"),
                       ({"page_token": "7.1"}, "page_token"), ({"account_no": "123"}, "account_no")):
        with pytest.raises(InvalidField) as e:
            ag.list_agreements([engine], "ICBC", **{"page_size": 10, **bad})  # type: ignore[arg-type]
        assert e.value.field == field


def _reading(engine: Engine, acct: str, period: str, kwh: int) -> None:
    from mis_adapter.db.core import Meter
    with engine.begin() as conn:
        meter = f"M{acct}"
        if conn.execute(sa.select(Meter.__table__.c.meter_no).where(Meter.__table__.c.meter_no == meter)).first() \
                is None:
            conn.execute(sa.insert(Meter.__table__).values(meter_no=meter, account_no=acct,
                                                           installed_on=dt.date(2020, 1, 1)))
        conn.execute(sa.insert(Reading.__table__).values(meter_no=meter, account_no=acct, period=period,
                                                         register_kwh=1000 + kwh, kwh=kwh, read_on=TODAY,
                                                         billed=False))


def _fed(engine: Engine) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(T_OUT.c.bank_id, T_OUT.c.account_no, T_OUT.c.period)
                                               .order_by(T_OUT.c.bank_id, T_OUT.c.seq))]


@pytest.mark.timeout(120)
def test_issuance_feeds_by_start_limit_and_end_and_end_withdraws(engine: Engine) -> None:
    clock = ManualClock(NOON)
    plain, limited, later, ended = (add_account(engine, "01", i) for i in range(1, 5))
    _sign(engine, "ICBC", "AG-1", plain)
    _sign(engine, "ICBC", "AG-2", limited, debit_limit_fen=100)          # 1 yuan: every bill is above it
    _sign(engine, "ABC", "AG-3", later, start_date=TODAY + dt.timedelta(days=3))
    _sign(engine, "ABC", "AG-4", ended)
    _end(engine, "ABC", "E-4", ended)
    for a in (plain, limited, later, ended):
        _reading(engine, a, "202610", 200)
    issue_bills(engine, clock, "202610")
    assert _fed(engine) == [("ICBC", plain, "202610")]
    # After the start date the later agreement feeds; ending withdraws the unanswered notice.
    clock.advance(dt.timedelta(days=3))
    for a in (plain, later):
        _reading(engine, a, "202611", 200)
    issue_bills(engine, clock, "202611")
    assert ("ABC", later, "202611") in _fed(engine)
    with engine.begin() as conn:  # the bank answered the first notice of `plain` already
        first_bill = conn.execute(sa.select(T_OUT.c.bill_id).where(T_OUT.c.bank_id == "ICBC", T_OUT.c.seq == 1)
                                  ).scalar_one()
        conn.execute(sa.insert(DebitResultRow.__table__).values(
            bank_id="ICBC", seq=1, outcome="INSUFFICIENT_FUNDS", bank_serial="", amount_fen=0, bill_id=first_bill,
            account_no=plain, disposition="DUNNING", received_at=NOON))
    r = ag.end(engine, ag.EndCommand("ICBC", "E-1", plain), TODAY + dt.timedelta(days=3), NOON)
    assert r.withdrawn_notices == 1
    with engine.connect() as conn:
        wd = conn.execute(sa.select(FeedWithdrawal.__table__.c.bank_id, FeedWithdrawal.__table__.c.seq)).all()
    assert [tuple(w) for w in wd] == [("ICBC", 2)]
    with engine.connect() as conn:
        assert ag.withdrawn_among(conn, "ICBC", [1, 2, 3]) == {2}
        assert ag.withdrawn_among(conn, "ABC", [1, 2, 3]) == set()
    assert _end(engine, "ICBC", "E-1", plain).withdrawn_notices == 1   # the replay reports the same
    _reading(engine, plain, "202612", 200)
    issue_bills(engine, clock, "202612")
    assert ("ICBC", plain, "202612") not in _fed(engine)


@pytest.mark.timeout(120)
def test_concurrent_same_serial_signs_once_and_replays(engine: Engine) -> None:
    import threading

    acct = add_account(engine, "01", 1)
    results: list[ag.SignResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            r = _sign(engine, "ICBC", "AG-RACE", acct)
            with lock:
                results.append(r)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 6
    assert sorted(r.replayed for r in results) == [False] + [True] * 5
    assert len({r.agreement.agreement_id for r in results}) == 1
