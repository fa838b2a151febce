"""A journal group commit whose answer is lost (bridge.journal.writer): the connection breaks once
the batch is sent, the server commits it all the same, and the writer retries the batch on a new
connection. The retry recognises what landed (Journal.landed): the batch's own rows count as
inserted by it — so their pays are forwarded and paid, not answered as a stranger's serial and
tombstoned — and its outcomes are not applied twice (one audit line each).

The fault is real: the bridge's PostgreSQL connection crosses a link (tests.support.netns_link)
whose answers are dropped, so the journal row reaches the server and its acknowledgement does
not; the writer's connection gives up after the dead-link bound (yindian_common.db)."""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bridge import journal as jn
from bridge.journal import Entry, Journal
from tests.bridge.conftest import BankCore, Utility, new_serial, pay_request
from tests.support.databases import fresh_database
from tests.support.netns_link import NetnsLink, database_link
from tests.support.waiting import wait_until
from yindian_common.db import DB_LINK_DEAD_S, make_engine

pytestmark = pytest.mark.timeout(180)

AT = dt.datetime(2026, 11, 28, 2, 0, 0, 123_456, tzinfo=dt.UTC)
DAY = dt.date(2026, 11, 28)


def pay(serial: str, created_at: dt.datetime = AT, amount_fen: int = 1_000) -> Entry:
    return Entry(kind=jn.PAY, serial=serial, bank_id="ICBC", amount_fen=amount_fen, state=jn.PENDING,
                 business_date=DAY, created_at=created_at, updated_at=created_at, account_no="0100000017",
                 outlet_code="O1", teller_id="T1", channel=1)


def test_landed_tells_a_lost_writes_own_rows_and_applied_outcomes_from_the_rest(engine: Engine) -> None:
    j = Journal(engine)
    own, own2, earlier, other_params = pay("OWN"), pay("OWN2"), pay("EARLIER"), pay("PARAMS")
    posted = jn.outcome_for(pay("DONE"), jn.POSTED, AT + dt.timedelta(seconds=5), status_code=0)
    j.write([own, own2, earlier, other_params, pay("DONE")], [])
    j.write([], [posted])
    later = AT + dt.timedelta(seconds=1)  # another instant at every back end's precision (MariaDB: seconds)
    with engine.connect() as conn:
        mine, applied = j.landed(
            [own, own2, pay("EARLIER", created_at=later), pay("PARAMS", amount_fen=2_000), pay("NEVER")],
            [posted, jn.outcome_for(pay("OWN"), jn.POSTED, later, status_code=0),
             jn.outcome_for(pay("DONE"), jn.POSTED, later, status_code=0)], conn)
        assert not conn.in_transaction()  # the writer's one-statement batch needs an idle connection
        assert j.landed([], [], conn) == (set(), set())
    assert mine == {own.key, own2.key}  # journaled by another life (other instant) or other parameters: not ours
    assert applied == {posted.key}      # same state at another instant is another outcome


def test_a_pay_whose_journal_commit_lost_its_answer_is_settled_without_the_bank_and_audited_once(
        tmp_path: Path, utility: Utility, make_bridge: Callable[..., BankCore],
        caplog: pytest.LogCaptureFixture) -> None:
    """The journal's answer is lost for longer than the pay may wait (the dead-link bound, 10 s, is past
    the 5 s deadline cap): the bank is told the pay is in doubt, as it is for any slow journal. The row
    the lost commit wrote is the writer's own, so it is marked SUSPECT for the resolver, which settles it
    (never forwarded: tombstoned, NOT_APPLIED) with no retry by the bank. Before, the writer's retry
    found the row "already journaled", released it, and it stayed PENDING until the bridge restarted:
    the day's reconciliation answered DAY_IN_DOUBT all along."""
    with fresh_database("postgresql", tmp_path, schema="bridge") as url:
        direct = make_engine(url, pool_size=1)
        try:
            with database_link(url) as (link, far_url):
                core = make_bridge(utility.address, db=far_url, resolver_enabled=True, resolver_idle_wait_s=0.2)
                try:
                    lost_answer(core, link, utility, direct, caplog)
                finally:  # while its database is still reachable (the fixture's own stop comes after the link)
                    core.channel.close()
                    core.bridge.stop()
        finally:
            direct.dispose()


def lost_answer(core: BankCore, link: NetnsLink, utility: Utility, direct: Engine,
                caplog: pytest.LogCaptureFixture) -> None:
    acct = next(utility.accounts)
    assert core.pay(new_serial("WARM"), acct, 100).amount_fen == 100
    serial = new_serial("LOST")
    caplog.set_level(logging.WARNING, logger="yindian.bridge")
    link.blackhole(answers_only=True)
    call = core.stub.Pay.future(pay_request(serial, acct, 2_500), timeout=30)

    def journal_row() -> tuple[str, dict[str, int]] | None:
        with direct.connect() as conn:
            state = conn.execute(sa.text("SELECT state FROM bridge_journal WHERE kind = 'PAY' AND "
                                         "serial = :s"), {"s": serial}).scalar()
            lines = dict(conn.execute(sa.text(  # type: ignore[arg-type]
                "SELECT state, COUNT(*) FROM bridge_audit WHERE kind = 'PAY' AND serial = :s "
                "GROUP BY state"), {"s": serial}).all())
        return None if state is None else (state, lines)

    wait_until(lambda: journal_row() is not None, "the pay's journal row committed on the server")
    with pytest.raises(grpc.RpcError) as told:
        call.result(timeout=30)
    assert told.value.code() == grpc.StatusCode.UNAVAILABLE  # in doubt: the bank may ask or retry
    wait_until(lambda: "event=journal_write_failed" in caplog.text,
               "the writer giving its connection up", timeout_s=DB_LINK_DEAD_S + 15)
    link.heal()
    wait_until(lambda: (journal_row() or ("", {}))[0] == jn.NOT_APPLIED,
               "the resolver settling the row", timeout_s=60)
    assert "event=journal_write_landed rows=1" in caplog.text
    got = journal_row()
    assert got is not None
    assert got[1].get(jn.SUSPECT) == 1 and got[1].get(jn.NOT_APPLIED) == 1, got  # each outcome once
    held = utility.payment(serial)  # never paid at the utility: it holds the serial's tombstone only
    assert held is not None and held["state"] == "TOMBSTONE", held
