"""Refunds offered back to a bank configured for them, on real databases:
the credit leaves the account when offered, listing until acknowledged,
acknowledgement exactly once, refusals that write nothing, day totals."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter import agreements as ag
from mis_adapter import link_state as ls
from mis_adapter import refunds as rf
from mis_adapter.db.core import Customer, JournalEntry, PrepaidEntry
from mis_adapter.db.feed import RefundRow
from mis_adapter.migrate import upgrade
from tests.support.mis_data import NOON, TODAY, add_account, add_bank, row_counts
from yindian_common.db import make_engine
from yindian_common.errors import InvalidField, SerialConflict

ONE = dt.timedelta(days=1)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    e = make_engine(db_url)
    upgrade(e)
    add_bank(e, "ICBC")
    add_bank(e, "ABC")
    yield e
    e.dispose()


def _list_refund(engine: Engine, bank: str, seq: int, acct: str, amount_fen: int) -> None:
    """What the feed does for a debit that met a settled bill: credit plus a listed refund."""
    with engine.begin() as conn:
        conn.execute(sa.update(Customer.__table__).where(Customer.__table__.c.account_no == acct)
                     .values(prepaid_fen=Customer.__table__.c.prepaid_fen + amount_fen))
        conn.execute(sa.insert(RefundRow.__table__).values(
            bank_id=bank, seq=seq, bill_id=seq, account_no=acct, bank_serial=f"AD-{seq}", amount_fen=amount_fen,
            payment_id=None, listed_at=NOON))
        rf.offer_in_tx(conn, bank, [seq], NOON)


def _prepaid(engine: Engine, acct: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(Customer.__table__.c.prepaid_fen)
                                .where(Customer.__table__.c.account_no == acct)).scalar_one())


@pytest.mark.timeout(120)
def test_prepaid_mode_keeps_credit_refund_mode_offers_it(engine: Engine) -> None:
    a1, a2 = add_account(engine, "01", 1), add_account(engine, "01", 2)
    ag.sign(engine, ag.SignCommand("ICBC", "AG-2", a2, "SAV-77"), TODAY, NOON)
    _list_refund(engine, "ICBC", 1, a1, 5_000)
    assert rf.list_open(engine, "ICBC", 0) == [] and _prepaid(engine, a1) == 5_000
    ls.set_refund_mode(engine, "ICBC", ls.REFUND, TODAY, NOON)
    _list_refund(engine, "ICBC", 2, a2, 3_000)
    assert _prepaid(engine, a2) == 0
    (offer,) = rf.list_open(engine, "ICBC", 0)
    assert (offer.account_no, offer.amount_fen, offer.original_serial, offer.savings_account_ref) == \
        (a2, 3_000, "AD-2", "SAV-77")
    assert rf.list_open(engine, "ABC", 0) == []
    with engine.connect() as conn:
        ledger = conn.execute(sa.select(PrepaidEntry.__table__.c.reason, PrepaidEntry.__table__.c.delta_fen)).all()
    assert [tuple(x) for x in ledger] == [("REFUND_OFFERED", -3_000)]


@pytest.mark.timeout(120)
def test_acknowledge_once_and_refusals(engine: Engine) -> None:
    ls.set_refund_mode(engine, "ICBC", ls.REFUND, TODAY, NOON)
    accts = [add_account(engine, "01", i) for i in (1, 2)]
    _list_refund(engine, "ICBC", 1, accts[0], 1_000)
    _list_refund(engine, "ICBC", 2, accts[1], 2_500)
    ids = [o.refund_id for o in rf.list_open(engine, "ICBC", 0)]
    before = row_counts([engine])
    for acks, field, exc in (
            ([rf.RefundAckIn(ids[0], "CR-1", 999)], "acks[0].amount_fen", InvalidField),
            ([rf.RefundAckIn(ids[0], "CR-1", 1_000), rf.RefundAckIn(999_999, "CR-2", 1)], "acks[1].refund_id",
             InvalidField),
            ([rf.RefundAckIn(ids[0], "bad serial", 1_000)], "acks[0].credit_serial", InvalidField),
            ([rf.RefundAckIn(ids[0], "CR-1", 1_000), rf.RefundAckIn(ids[1], "CR-1", 2_500)],
             "acks[1].credit_serial", InvalidField),
            ([], "acks", InvalidField)):
        with pytest.raises(exc) as e:
            rf.acknowledge(engine, "ICBC", acks, TODAY, NOON)
        assert e.value.field == field
    with pytest.raises(InvalidField) as other:   # another bank's refund looks absent
        rf.acknowledge(engine, "ABC", [rf.RefundAckIn(ids[0], "CR-1", 1_000)], TODAY, NOON)
    assert other.value.field == "acks[0].refund_id"
    assert row_counts([engine]) == before
    r = rf.acknowledge(engine, "ICBC", [rf.RefundAckIn(ids[0], "CR-1", 1_000)], TODAY, NOON)
    assert (r.acknowledged, r.replayed, r.settlement_date, r.acknowledged_fen) == (1, 0, TODAY, 1_000)
    assert [o.refund_id for o in rf.list_open(engine, "ICBC", 0)] == [ids[1]]
    after = row_counts([engine])
    again = rf.acknowledge(engine, "ICBC", [rf.RefundAckIn(ids[0], "CR-1", 1_000)], TODAY, NOON)
    assert (again.acknowledged, again.replayed) == (0, 1)
    with pytest.raises(SerialConflict):
        rf.acknowledge(engine, "ICBC", [rf.RefundAckIn(ids[0], "CR-9", 1_000)], TODAY, NOON)
    with pytest.raises(SerialConflict):
        rf.acknowledge(engine, "ICBC", [rf.RefundAckIn(ids[1], "CR-1", 2_500)], TODAY, NOON)
    assert row_counts([engine]) == after
    # After a sign-off the refund counts in tomorrow's settlement.
    ls.sign_off(engine, "ICBC", TODAY, NOON)
    late = rf.acknowledge(engine, "ICBC", [rf.RefundAckIn(ids[1], "CR-2", 2_500)], TODAY, NOON)
    assert late.settlement_date == TODAY + ONE
    with engine.connect() as conn:
        assert rf.day_totals(conn, "ICBC", TODAY) == (1, 1_000)
        assert rf.day_totals(conn, "ICBC", TODAY + ONE) == (1, 2_500)
        assert rf.day_totals(conn, "ABC", TODAY) == (0, 0)
        acks = conn.execute(sa.select(sa.func.count()).select_from(JournalEntry.__table__)
                            .where(JournalEntry.__table__.c.rpc == "REFUND_ACK")).scalar_one()
    assert acks == 2
