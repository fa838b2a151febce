"""The MIS journal's tamper-evident chain: `mis_adapter audit verify` exits 0
on an intact chain and 1 naming an edited, deleted or reordered entry; the
journal refuses UPDATE and DELETE (triggers) on SQLite, PostgreSQL and MariaDB."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from mis_adapter.db.audit import JOURNAL_CHAIN
from tests.support.mis_data import BillSpec, RunningAdapter, add_account, running_adapter
from tests.support.procs import REPO
from yindian.v1 import billing_pb2 as pb
from yindian_common.audit_chain import drop_append_only_ddl

pytestmark = [pytest.mark.timeout(180), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema


@pytest.fixture
def adapter(db_url: str) -> Iterator[RunningAdapter]:
    with running_adapter(db_url) as a:
        yield a


def verify(db_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mis_adapter", "audit", "verify", "--db", db_url], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def entry_ids(adapter: RunningAdapter) -> list[int]:
    with adapter.engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT entry_id FROM journal ORDER BY entry_id"))]


def test_chain_verifies_and_names_tampered_entries(adapter: RunningAdapter, db_url: str) -> None:
    acct = add_account(adapter.engine, "01", 7, [BillSpec("202610", 9_000, dt.date(2026, 12, 20))])
    for i in range(5):
        adapter.stub.Pay(pb.PayRequest(bank_serial=f"AU-{i}", account_no=acct, amount_fen=100 + i, outlet_code="O1",
                                       teller_id="T1", channel=pb.CHANNEL_COUNTER), metadata=adapter.md())
    adapter.stub.Cancel(pb.CancelRequest(cancel_serial="AUC-1", original_serial="AU-0", amount_fen=100, reason="r"),
                        metadata=adapter.md())
    assert JOURNAL_CHAIN.seal_pending(adapter.engine, dt.datetime.now(dt.UTC)) == 6
    ok = verify(db_url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "6 sealed entries checked, 0 problems" in ok.stdout

    # append-only: the database itself refuses
    with pytest.raises(sa.exc.DBAPIError), adapter.engine.begin() as conn:
        conn.execute(sa.text("UPDATE journal SET amount_fen = 1"))
    with pytest.raises(sa.exc.DBAPIError), adapter.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM journal"))

    # someone with the database owner's rights drops the triggers and edits, deletes, reorders
    ids = entry_ids(adapter)
    with adapter.engine.begin() as conn:
        for stmt in drop_append_only_ddl(adapter.engine.dialect.name, "journal"):
            conn.execute(sa.text(stmt))
        conn.execute(sa.text("UPDATE journal SET amount_fen = amount_fen + 1 WHERE entry_id = :i"), {"i": ids[1]})
        conn.execute(sa.text("DELETE FROM journal WHERE entry_id = :i"), {"i": ids[2]})
        a, b = conn.execute(sa.text("SELECT serial FROM journal WHERE entry_id IN (:x, :y) ORDER BY entry_id"),
                            {"x": ids[3], "y": ids[4]}).scalars().all()
        conn.execute(sa.text("UPDATE journal SET serial = :s WHERE entry_id = :i"), {"s": b, "i": ids[3]})
        conn.execute(sa.text("UPDATE journal SET serial = :s WHERE entry_id = :i"), {"s": a, "i": ids[4]})
    bad = verify(db_url)
    assert bad.returncode == 1, bad.stdout
    assert f"entry {ids[1]} edited" in bad.stdout
    assert f"entry {ids[2]} deleted" in bad.stdout
    assert f"entry {ids[3]} edited or reordered" in bad.stdout and f"entry {ids[4]} edited or reordered" in bad.stdout
    assert f"entry {ids[0]} " not in bad.stdout and f"entry {ids[5]} " not in bad.stdout


def copy_entry(adapter: RunningAdapter, source_id: int, new_id: int) -> None:
    """A journal row with an id of our choosing (an id taken earlier whose transaction committed late)."""
    cols = [c for c in JOURNAL_CHAIN.columns if c != "entry_id"]
    with adapter.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO journal (entry_id, {', '.join(cols)}) "
                             f"SELECT :new_id, {', '.join(cols)} FROM journal WHERE entry_id = :source_id"),
                     {"new_id": new_id, "source_id": source_id})


def test_background_pass_looks_back_a_window_and_a_full_pass_seals_the_rest(adapter: RunningAdapter,
                                                                          db_url: str) -> None:
    acct = add_account(adapter.engine, "01", 8, [BillSpec("202610", 9_000, dt.date(2026, 12, 20))])
    for i in range(2):
        adapter.stub.Pay(pb.PayRequest(bank_serial=f"LB-{i}", account_no=acct, amount_fen=100, outlet_code="O1",
                                       teller_id="T1", channel=pb.CHANNEL_COUNTER), metadata=adapter.md())
    now = dt.datetime.now(dt.UTC)
    first = entry_ids(adapter)[0]
    copy_entry(adapter, first, first + 1_000)
    assert JOURNAL_CHAIN.seal_pending(adapter.engine, now, lookback_ids=10) == 3
    copy_entry(adapter, first, first + 500)  # committed after a row with a higher id was sealed
    copy_entry(adapter, first, first + 995)
    assert JOURNAL_CHAIN.seal_pending(adapter.engine, now, lookback_ids=10) == 1  # only the one in the window
    assert JOURNAL_CHAIN.seal_pending(adapter.engine, now) == 1  # the whole table: the late one too
    ok = verify(db_url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "5 sealed entries checked, 0 problems" in ok.stdout
