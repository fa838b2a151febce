"""Sign-on / sign-off (签到/签退) on real databases, and the settlement-date
rule they feed: after a sign-off today's payments settle tomorrow."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter import link_state as ls
from mis_adapter.allocation import settlement_date
from mis_adapter.banks import settlement_day
from mis_adapter.db.core import JournalEntry
from mis_adapter.db.recon import ReconciledDay
from mis_adapter.migrate import upgrade
from tests.support.mis_data import NOON, TODAY, add_bank, row_counts
from yindian_common.db import make_engine
from yindian_common.errors import DayClosed, Forbidden, InvalidField

ONE = dt.timedelta(days=1)


def test_settlement_date_rule() -> None:
    assert settlement_date(TODAY, today_reconciled=False, next_reconciled=False) == TODAY
    assert settlement_date(TODAY, today_reconciled=False, next_reconciled=False, signed_off=True) == TODAY + ONE
    assert settlement_date(TODAY, today_reconciled=True, next_reconciled=False) == TODAY + ONE
    with pytest.raises(DayClosed):
        settlement_date(TODAY, today_reconciled=False, next_reconciled=True, signed_off=True)
    assert ls.signed_off_for(ls.SIGNED_OFF, TODAY, TODAY)
    assert not ls.signed_off_for(ls.SIGNED_OFF, TODAY - ONE, TODAY)   # yesterday's sign-off: today is open
    assert not ls.signed_off_for(ls.SIGNED_ON, TODAY, TODAY)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    e = make_engine(db_url)
    upgrade(e)
    add_bank(e, "ICBC")
    add_bank(e, "ABC")
    yield e
    e.dispose()


def _day(engine: Engine, bank: str, today: dt.date = TODAY) -> dt.date:
    with engine.connect() as conn:
        return settlement_day(conn, bank, today)


@pytest.mark.timeout(120)
def test_sign_off_moves_settlement_and_sign_on_restores_it(engine: Engine) -> None:
    with engine.connect() as conn:
        assert ls.read_link(conn, "ICBC").state == ls.OPEN
    assert _day(engine, "ICBC") == TODAY
    off = ls.sign_off(engine, "ICBC", TODAY, NOON)
    assert (off.state, off.business_date, off.suspended) == (ls.SIGNED_OFF, TODAY, False)
    assert _day(engine, "ICBC") == TODAY + ONE and _day(engine, "ABC") == TODAY
    assert _day(engine, "ICBC", TODAY + ONE) == TODAY + ONE          # the next day is open again
    assert ls.sign_off(engine, "ICBC", TODAY, NOON) == off            # idempotent
    on = ls.sign_on(engine, "ICBC", TODAY, NOON)
    assert on.state == ls.SIGNED_ON and _day(engine, "ICBC") == TODAY
    with engine.begin() as conn:
        conn.execute(sa.insert(ReconciledDay.__table__).values(bank_id="ICBC", settlement_date=TODAY,
                                                               reconciled_at=NOON, summary_json="{}"))
    assert _day(engine, "ICBC") == TODAY + ONE
    with engine.connect() as conn:
        rpcs = [r for (r,) in conn.execute(sa.select(JournalEntry.__table__.c.rpc)
                                           .order_by(JournalEntry.__table__.c.entry_id))]
    assert rpcs == ["SIGN_OFF", "SIGN_OFF", "SIGN_ON"]
    states = {v.bank_id: v.state for v in ls.link_states(engine)}
    assert states == {"ABC": ls.OPEN, "ICBC": ls.SIGNED_ON}


@pytest.mark.timeout(120)
def test_unknown_bank_and_refund_mode(engine: Engine) -> None:
    before = row_counts([engine])
    with pytest.raises(Forbidden):
        ls.sign_on(engine, "NOPE", TODAY, NOON)
    with pytest.raises(InvalidField):
        ls.set_refund_mode(engine, "ICBC", "CASH", TODAY, NOON)
    assert row_counts([engine]) == before
    v = ls.set_refund_mode(engine, "ICBC", ls.REFUND, TODAY, NOON)
    assert (v.refund_mode, v.state) == (ls.REFUND, ls.OPEN)
    with engine.connect() as conn:
        assert ls.refund_mode(conn, "ICBC") == ls.REFUND
        assert ls.refund_mode(conn, "ABC") == ls.PREPAID
    assert _day(engine, "ICBC") == TODAY


@pytest.mark.timeout(120)
def test_link_state_gauge_one_state_per_bank_suspension_overrides(engine: Engine) -> None:
    from prometheus_client import CollectorRegistry

    from mis_adapter import metrics_collector as mc
    from mis_adapter.banks import set_suspended
    from yindian_common import business_metrics as bm
    from yindian_common.clock import ManualClock

    reg = CollectorRegistry()
    collector = mc.register([engine], ManualClock(NOON), bm.CollectorLimits(refresh_s=3600.0), registry=reg)

    def shown() -> dict[str, str]:
        collector.refresh()
        out: dict[str, str] = {}
        for m in reg.collect():
            for s in m.samples:
                if s.name == mc.LINK_STATE:
                    assert s.labels["state"] in mc.LINK_STATES
                    if s.value == 1.0:
                        assert s.labels["bank"] not in out, "one state per bank"
                        out[s.labels["bank"]] = s.labels["state"]
        return out

    assert shown() == {"ICBC": "open", "ABC": "open"}
    ls.sign_on(engine, "ICBC", TODAY, NOON)
    ls.sign_off(engine, "ABC", TODAY, NOON)
    assert shown() == {"ICBC": "signed_on", "ABC": "signed_off"}
    set_suspended(engine, "ICBC", True, "maintenance", NOON)
    assert shown() == {"ICBC": "suspended", "ABC": "signed_off"}
