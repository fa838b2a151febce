"""Refunds with branch databases (issue 15 on issue 10's topology): a REFUND
bank's over-debit in a branch database is offered there (the refund mode is
copied to the branches), listed with the primary's under wire ids unique
across databases, acknowledged exactly once in its own database, and netted
by the day's reconciliation summed over the branches. With one database the
wire ids stay the database's own ids."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter import bank_admin, recon_branches
from mis_adapter import link_state as ls
from mis_adapter import refunds as rf
from mis_adapter.db.core import Customer, JournalEntry
from mis_adapter.db.feed import RefundRow
from mis_adapter.db.link import RefundOffer
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.migrate import upgrade
from mis_adapter.routing import BranchRouter
from tests.conftest import TOPOLOGY_PARAMS
from tests.mis_adapter.test_link_service import _refused
from tests.support.mis_data import NOON, TODAY, add_account, add_bank, running_adapter
from tests.support.topology import BRANCHES3, Topology, topology_databases
from yindian.v1 import billing_pb2 as pb
from yindian_common.errors import InvalidField, SerialConflict

pytestmark = [pytest.mark.timeout(180), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema

T_CUST, T_OFFER, T_JOURNAL = Customer.__table__, RefundOffer.__table__, JournalEntry.__table__


@pytest.fixture(params=[*TOPOLOGY_PARAMS, pytest.param(("mariadb", BRANCHES3), id="mariadb-branches3")])
def router_topo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[BranchRouter, Topology]]:
    backend, name = request.param
    with topology_databases(backend, name, tmp_path, schema="mis") as topo:
        router = BranchRouter.from_specs(topo.db, topo.branch_db, pool_size=2)
        try:
            for e in router.all_engines():
                upgrade(e)
            add_bank(router.primary, "ICBC")
            add_bank(router.primary, "ABC")
            yield router, topo
        finally:
            router.dispose()


def _over_debit(engine: Engine, bank: str, seq: int, acct: str, amount_fen: int) -> int:
    """What the feed does, in the account's database, for a debit that met a settled bill:
    credit plus a listed refund, offered when that database says the bank is REFUND."""
    with engine.begin() as conn:
        conn.execute(sa.update(T_CUST).where(T_CUST.c.account_no == acct)
                     .values(prepaid_fen=T_CUST.c.prepaid_fen + amount_fen))
        refund_id = conn.execute(sa.insert(RefundRow.__table__).values(
            bank_id=bank, seq=seq, bill_id=seq, account_no=acct, bank_serial=f"AD-{seq}", amount_fen=amount_fen,
            payment_id=None, listed_at=NOON)).inserted_primary_key[0]
        rf.offer_in_tx(conn, bank, [seq], NOON)
    return int(refund_id)


def _prepaid(engine: Engine, acct: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(T_CUST.c.prepaid_fen).where(T_CUST.c.account_no == acct)).scalar_one())


def _offers(engine: Engine) -> list[tuple[int, str, str | None]]:
    with engine.connect() as conn:
        return [(int(r.refund_id), r.state, r.credit_serial) for r in conn.execute(
            sa.select(T_OFFER).order_by(T_OFFER.c.refund_id))]


def _ack_lines(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(T_JOURNAL)
                                .where(T_JOURNAL.c.rpc == "REFUND_ACK")).scalar_one())


def test_refunds_of_every_branch_listed_and_acknowledged_once(
        router_topo: tuple[BranchRouter, Topology]) -> None:
    router, topo = router_topo
    far = topo.codes[1] if topo.split else "01"   # branch 02's database, or the only one
    home, away = router.engine_for_branch("01"), router.engine_for_branch(far)
    a_home, a_away = add_account(home, "01", 1), add_account(away, far, 2)
    a_abc = add_account(away, far, 3)
    # The operator's command, given the branch databases: the mode reaches every database at once.
    assert bank_admin.main(["refund-mode", "ICBC", "refund", *topo.cli_flags()]) == 0
    for e in router.engines():
        with e.connect() as conn:
            assert ls.refund_mode(conn, "ICBC") == ls.REFUND and ls.refund_mode(conn, "ABC") == ls.PREPAID
    local_home = _over_debit(home, "ICBC", 1, a_home, 5_000)
    local_away = _over_debit(away, "ICBC", 2, a_away, 3_000)
    _over_debit(away, "ABC", 3, a_abc, 700)  # PREPAID bank: stays the account's credit
    assert (_prepaid(home, a_home), _prepaid(away, a_away), _prepaid(away, a_abc)) == (0, 0, 700)

    dbs = rf.databases_of(router.database_keys(), router.engines())
    listed = rf.list_open_across(dbs, "ICBC", 0)
    assert [(r.account_no, r.amount_fen) for r in listed] == [(a_home, 5_000), (a_away, 3_000)]
    ids = [r.refund_id for r in listed]
    if topo.split:
        assert ids == [local_home * 100, local_away * 100 + 2]  # 00: the primary, 02: branch 02
    else:
        assert ids == [local_home, local_away]  # one database: its own ids, as before
    assert rf.list_open_across(dbs, "ABC", 0) == []
    assert len(rf.list_open_across(dbs, "ICBC", 1)) == 1

    # Another bank's refund id, and an id of no database, are refused; nothing is written.
    with pytest.raises(InvalidField) as e1:
        rf.acknowledge_across(dbs, "ABC", [rf.RefundAckIn(ids[1], "CR-X", 3_000)], TODAY, NOON)
    assert e1.value.field == "acks[0].refund_id"
    with pytest.raises(InvalidField) as e2:
        rf.acknowledge_across(dbs, "ICBC", [rf.RefundAckIn(ids[0], "CR-1", 5_000),
                                            rf.RefundAckIn(ids[1] + 7, "CR-2", 3_000)], TODAY, NOON)
    assert e2.value.field == "acks[1].refund_id"
    assert [s for e in router.engines() for _i, s, _c in _offers(e)] == [rf.OFFERED, rf.OFFERED]

    acks = [rf.RefundAckIn(ids[0], "CR-1", 5_000), rf.RefundAckIn(ids[1], "CR-2", 3_000)]
    first = rf.acknowledge_across(dbs, "ICBC", acks, TODAY, NOON)
    assert (first.acknowledged, first.replayed, first.acknowledged_fen, first.settlement_date) == (2, 0, 8_000,
                                                                                                   TODAY)
    again = rf.acknowledge_across(dbs, "ICBC", acks, TODAY, NOON)
    assert (again.acknowledged, again.replayed, again.acknowledged_fen) == (0, 2, 0)
    assert rf.list_open_across(dbs, "ICBC", 0) == []
    if topo.split:
        assert _offers(home) == [(local_home, rf.ACKNOWLEDGED, "CR-1")]
        assert _offers(away) == [(local_away, rf.ACKNOWLEDGED, "CR-2")]
        assert (_ack_lines(home), _ack_lines(away)) == (1, 1)
    else:
        assert _offers(home) == [(local_home, rf.ACKNOWLEDGED, "CR-1"), (local_away, rf.ACKNOWLEDGED, "CR-2")]
        assert _ack_lines(home) == 2

    # A credit serial is one refund across databases: CR-1 (the primary's) cannot acknowledge branch 03's.
    third_code = topo.codes[-1]
    third = router.engine_for_branch(third_code)
    local_third = _over_debit(third, "ICBC", 4, add_account(third, third_code, 4), 900)
    (open_third,) = rf.list_open_across(dbs, "ICBC", 0)
    assert open_third.refund_id == (local_third * 100 + 3 if topo.split else local_third)
    with pytest.raises(SerialConflict):
        rf.acknowledge_across(dbs, "ICBC", [rf.RefundAckIn(open_third.refund_id, "CR-1", 900)], TODAY, NOON)
    assert rf.list_open_across(dbs, "ICBC", 0) == [open_third]

    # The day's reconciliation nets both acknowledged refunds, summed over the branches.
    with recon_branches.reconciliation(router, "ICBC", TODAY, rates=LateFeeRates(),
                                       now=NOON + dt.timedelta(hours=10)) as run:
        run.check_trailer(0, 0)
        summary = run.close_day()
    assert (summary.refund_count, summary.refund_fen, summary.net_settlement_fen) == (2, 8_000, -8_000)


@pytest.mark.timeout(30)
def test_refund_id_numbers_do_not_depend_on_flag_order_and_00_is_refused(tmp_path: Path) -> None:
    urls = {c: f"sqlite:///{tmp_path / c}.db" for c in ("main", "02", "05")}
    one = BranchRouter.from_specs(urls["main"], [f"02={urls['02']}", f"05={urls['05']}"], pool_size=1)
    other = BranchRouter.from_specs(urls["main"], [f"05={urls['05']}", f"02={urls['02']}"], pool_size=1)
    shared = BranchRouter.from_specs(urls["main"], [f"00={urls['02']}"], pool_size=1)
    try:
        numbers = [{str(d.engine.url): d.number for d in rf.databases_of(r.database_keys(), r.engines())}
                   for r in (one, other)]
        assert numbers[0] == numbers[1] == {urls["main"]: 0, urls["02"]: 2, urls["05"]: 5}
        with pytest.raises(ValueError, match="00"):
            rf.databases_of(shared.database_keys(), shared.engines())
    finally:
        for r in (one, other, shared):
            r.dispose()


def test_refunds_of_two_databases_over_the_wire(topology: Topology) -> None:
    """The mode set on the primary reaches branch 02 by the bank's SignOn; ListRefunds and
    AcknowledgeRefunds answer both refunds, and statuses stay those of one database."""
    with running_adapter(topology.db, branch_db=topology.branch_db) as ra:
        far = topology.codes[1] if topology.split else "01"
        home, away = ra.ctx.router.engine_for_branch("01"), ra.ctx.router.engine_for_branch(far)
        a_home, a_away = add_account(home, "01", 1), add_account(away, far, 2)
        ls.set_refund_mode(ra.ctx.router.primary, "ICBC", ls.REFUND, TODAY, NOON)
        s = ra.stub
        s.SignOn(pb.SignOnRequest(), timeout=10, metadata=ra.md("ICBC"))
        _over_debit(home, "ICBC", 1, a_home, 4_000)
        _over_debit(away, "ICBC", 2, a_away, 1_500)
        notices = s.ListRefunds(pb.ListRefundsRequest(), timeout=10, metadata=ra.md("ICBC")).refunds
        assert [(n.account_no, n.amount_fen, n.original_serial) for n in notices] == \
            [(a_home, 4_000, "AD-1"), (a_away, 1_500, "AD-2")]
        assert list(s.ListRefunds(pb.ListRefundsRequest(), timeout=10, metadata=ra.md("ABC")).refunds) == []
        ack = pb.AcknowledgeRefundsRequest(acks=[
            pb.RefundAck(refund_id=n.refund_id, credit_serial=f"CR-{i}", amount_fen=n.amount_fen)
            for i, n in enumerate(notices)])
        assert _refused(s.AcknowledgeRefunds, ack, metadata=ra.md("ABC"))[:3] == \
            (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "acks[0].refund_id")
        r = s.AcknowledgeRefunds(ack, timeout=10, metadata=ra.md("ICBC"))
        assert (r.acknowledged, r.replayed, r.settlement_date) == (2, 0, TODAY.isoformat())
        again = s.AcknowledgeRefunds(ack, timeout=10, metadata=ra.md("ICBC"))
        assert (again.acknowledged, again.replayed) == (0, 2)
        assert list(s.ListRefunds(pb.ListRefundsRequest(), timeout=10, metadata=ra.md("ICBC")).refunds) == []
        assert (_prepaid(home, a_home), _prepaid(away, a_away)) == (0, 0)
