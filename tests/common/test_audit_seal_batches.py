"""Batch seals (one seal per pass over up to SEAL_BATCH_MAX entries) keep what the per-row chain
promised, on SQLite, PostgreSQL and MariaDB: verify names every entry edited, deleted or reordered
and every seal removed or edited, in the middle of a seal and at its edges; it finds problems
exactly when the per-row chain over the same rows and the same tampering would, naming the same
entries (hypothesis); a chain sealed per row by the code before, then extended by batch seals,
verifies and still names a tampered old and a tampered new entry, through the real migrations; the
downgrade turns the batch seals back into per-row seals the old code verifies, and refuses a
tampered chain; a row committed late with a lower id is still sealed; two sealers at once write one
seal."""
from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.journal.audit_chain import AUDIT_CHAIN
from mis_adapter.db.audit import JOURNAL_CHAIN
from mis_adapter.db.core import JournalEntry
from tests.common.test_audit_chain_hash import _audit_rows, _journal_rows, reference_chain
from tests.conftest import SERVERS
from yindian_common.audit_chain import (
    GENESIS,
    SEAL_BATCH_MAX,
    SEAL_LOOKBACK_IDS,
    Chain,
    ChainTampered,
    Sealer,
    batch_seals_table,
    drop_append_only_ddl,
    seals_table,
)
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(600)
NOW = dt.datetime(2026, 11, 30, 0, 0, 1, tzinfo=dt.UTC)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = make_engine(db_url, pool_size=3)
    yield eng
    eng.dispose()


def make_chain(md: sa.MetaData, name: str) -> Chain:
    """A journal-shaped table of our own with its two seal tables (no append-only triggers: the
    tests tamper freely)."""
    entries = JournalEntry.__table__.to_metadata(md, name=name)  # type: ignore[attr-defined]
    entries.primary_key.name = f"pk_{name}"  # constraint names are per schema on PostgreSQL
    return Chain(entries, "entry_id", seals_table(md, f"{name}_seals"), batch_seals_table(md, f"{name}_batches"))


def create(engine: sa.Engine, *chains: Chain) -> None:
    with engine.begin() as conn:
        for chain in chains:
            for table in (chain.entries, chain.seals, chain.batches):
                table.create(conn)


def add_rows(engine: sa.Engine, chain: Chain, rows: list[dict[str, Any]]) -> list[int]:
    """Inserts rows (with their entry_id if given); returns every id, ascending."""
    ident = chain.entries.c.entry_id
    with engine.begin() as conn:
        if rows:
            conn.execute(chain.entries.insert(), rows)
        return [r[0] for r in conn.execute(sa.select(ident).order_by(ident))]


def seal_per_row_like_before(conn: sa.Connection, chain: Chain) -> int:
    """What the sealer before batch seals wrote: one per-row seal per unsealed row, in id order,
    chained after the last one (the hash is test_audit_chain_hash's verbatim reference)."""
    s, key = chain.seals.c, chain.id_column
    ident = chain.entries.c[key]
    head = conn.execute(sa.select(s.seal_no, s.entry_hash).order_by(s.seal_no.desc()).limit(1)).first()
    seal_no, prev = (int(head.seal_no), str(head.entry_hash)) if head else (0, GENESIS)
    sealed = {i for (i,) in conn.execute(sa.select(s.entry_id))}
    rows = [dict(r) for r in conn.execute(sa.select(chain.entries).order_by(ident)).mappings()
            if r[key] not in sealed]
    if not rows:
        return 0
    columns = chain.columns
    hashes = reference_chain(prev, columns, rows)
    conn.execute(chain.seals.insert(), [
        {"seal_no": seal_no + 1 + k, "entry_id": r[key], "columns": ",".join(columns), "prev_hash": p,
         "entry_hash": h, "sealed_at": NOW} for k, (r, p, h) in enumerate(zip(rows, [prev, *hashes[:-1]], hashes, strict=True))])
    return len(rows)


def verify(engine: sa.Engine, chain: Chain) -> tuple[int, list[str], int]:
    with engine.connect() as conn:
        return chain.verify(conn)


def edit(conn: sa.Connection, chain: Chain, ident: int, **values: Any) -> None:
    conn.execute(chain.entries.update().where(chain.entries.c.entry_id == ident).values(**values))


def swap(conn: sa.Connection, chain: Chain, a: int, b: int) -> None:
    """Two rows trade their contents (ids stay): the order of what happened is rewritten."""
    e = chain.entries
    ra, rb = (dict(conn.execute(sa.select(e).where(e.c.entry_id == i)).mappings().one()) for i in (a, b))
    for ident, row in ((a, rb), (b, ra)):
        edit(conn, chain, ident, **{k: v for k, v in row.items() if k != "entry_id"})


def link_broken(seal_no: int, first: int, last: int) -> str:
    return (f"seal {seal_no} (entries {first}..{last}): link broken, previous hash differs (a seal was removed "
            "or edited)")


# ---- tampering, in the middle of a seal and at its edges ----

def sealed_35(engine: sa.Engine) -> tuple[Chain, list[int]]:
    """35 entries under four seals of 10, 10, 10 and 5."""
    chain = make_chain(sa.MetaData(), "tj")
    create(engine, chain)
    ids = add_rows(engine, chain, _journal_rows(random.Random(3), 35))
    counts = []
    while n := chain.seal_pending(engine, NOW, batch_max=10):
        counts.append(n)
    assert counts == [10, 10, 10, 5]
    assert verify(engine, chain) == (35, [], 0)
    return chain, ids


def test_verify_names_each_entry_edited_deleted_or_reordered_at_seal_edges_and_middles(engine: sa.Engine) -> None:
    chain, ids = sealed_35(engine)
    e = chain.entries
    with engine.begin() as conn:
        swap(conn, chain, ids[4], ids[5])                       # reordered, middle of seal 1
        edit(conn, chain, ids[10], amount_fen=1)                # edited, first of seal 2
        edit(conn, chain, ids[14], outcome="POSTED2")           # edited, middle of seal 2
        edit(conn, chain, ids[19], payment_id=7)                # edited, last of seal 2
        conn.execute(e.delete().where(e.c.entry_id == ids[20]))  # deleted, first of seal 3
        swap(conn, chain, ids[29], ids[30])                     # reordered across the edge of seals 3 and 4
        conn.execute(e.delete().where(e.c.entry_id == ids[33]))  # deleted, middle of seal 4
    checked, problems, unsealed = verify(engine, chain)
    assert (checked, unsealed) == (35, 0)
    assert problems == [
        f"entry {ids[4]} edited or reordered (seal 1)", f"entry {ids[5]} edited or reordered (seal 1)",
        f"entry {ids[10]} edited or reordered (seal 2)", f"entry {ids[14]} edited or reordered (seal 2)",
        f"entry {ids[19]} edited or reordered (seal 2)",
        f"entry {ids[20]} deleted (seal 3)", f"entry {ids[29]} edited or reordered (seal 3)",
        f"entry {ids[30]} edited or reordered (seal 4)", f"entry {ids[33]} deleted (seal 4)",
    ]


@pytest.mark.parametrize("removed", [1, 2, 4])
def test_verify_names_a_removed_seal_first_middle_or_last(engine: sa.Engine, removed: int) -> None:
    """A seal removed: its number is missing and the next seal's link is broken; its entries count as
    not sealed. (The last seal removed alone looks like a chain one seal shorter, as documented: its
    entries show as not yet sealed, and a sealer seals them again under the same number.)"""
    chain, ids = sealed_35(engine)
    b = chain.batches
    with engine.begin() as conn:
        conn.execute(b.delete().where(b.c.seal_no == removed))
    checked, problems, unsealed = verify(engine, chain)
    if removed == 4:
        assert (checked, problems, unsealed) == (30, [], 5)
        return
    first, last = ids[10 * removed], ids[10 * removed + 9]
    assert problems == [f"seals {removed}..{removed} missing (removed from the chain)",
                        link_broken(removed + 1, first, last)]
    assert (checked, unsealed) == (25, 10)


def test_verify_names_a_seal_edited_to_hide_an_edited_entry(engine: sa.Engine) -> None:
    """Someone edits an entry and writes its new digest into the seal: the seal's own hash gives it
    away (and a seal rehashed too breaks the next seal's link)."""
    from yindian_common.audit_chain import entry_digests, seal_hash
    chain, ids = sealed_35(engine)
    b, cols = chain.batches, chain.columns
    with engine.begin() as conn:
        edit(conn, chain, ids[25], amount_fen=123)
        row = conn.execute(sa.select(chain.entries).where(chain.entries.c.entry_id == ids[25])).mappings().one()
        seal = conn.execute(sa.select(b).where(b.c.seal_no == 3)).mappings().one()
        digests = bytearray(seal["digests"])
        digests[5 * 32:6 * 32] = entry_digests(cols, [tuple(row[c] for c in cols)])
        conn.execute(b.update().where(b.c.seal_no == 3).values(digests=bytes(digests)))
    assert verify(engine, chain)[1] == [f"seal 3 (entries {ids[20]}..{ids[29]}) edited: its hash differs from "
                                        "its contents"]
    with engine.begin() as conn:
        conn.execute(b.update().where(b.c.seal_no == 3).values(
            seal_hash=seal_hash(seal["prev_hash"], seal["columns"], bytes(seal["entry_ids"]), bytes(digests))))
    assert verify(engine, chain)[1] == [link_broken(4, ids[30], ids[34])]


# ---- property: the batch chain finds problems exactly when the per-row chain would ----

TAMPER = st.lists(st.tuples(st.sampled_from(["edit", "delete", "swap"]), st.integers(0, 10**6), st.integers(0, 10**6)),
                  max_size=4)


@pytest.fixture
def twin(engine: sa.Engine) -> tuple[sa.Engine, Chain, Chain]:
    md = sa.MetaData()
    rows, batches = make_chain(md, "tw_rows"), make_chain(md, "tw_batch")
    create(engine, rows, batches)
    return engine, rows, batches


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(phases=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 7)), min_size=1, max_size=3),
       seed=st.integers(0, 2**32), tamper=TAMPER, late=st.booleans())
def test_batch_seals_find_problems_exactly_where_per_row_seals_do(
        twin: tuple[sa.Engine, Chain, Chain], phases: list[tuple[int, int]], seed: int,
        tamper: list[tuple[str, int, int]], late: bool) -> None:
    """Both chains over the same rows (the same ids), journaled and sealed in phases (a batch size per
    phase; `late`: the last phase's first row takes an id below the sealed ones, as a transaction
    that committed late), then the same tampering: verify names the same entries on both."""
    engine, per_row, batch = twin
    with engine.begin() as conn:
        for chain in (per_row, batch):
            for table in (chain.batches, chain.seals, chain.entries):
                conn.execute(table.delete())
    rnd, next_id, ids = random.Random(seed), 1_000, []
    for k, (count, batch_max) in enumerate(phases):
        rows = _journal_rows(rnd, count)
        for row in rows:
            next_id += rnd.choice([1, 1, 1, 2])  # ids a rolled-back insert never used
            row["entry_id"] = next_id
        if late and k == len(phases) - 1 and k > 0:
            rows[0]["entry_id"] = ids[0] - 1 if rnd.random() < 0.5 else ids[-1] - 1 if ids[-1] - 1 not in ids else 1
        for chain in (per_row, batch):
            ids = add_rows(engine, chain, [dict(r) for r in rows])
        with engine.begin() as conn:
            seal_per_row_like_before(conn, per_row)
        while batch.seal_pending(engine, NOW, batch_max=batch_max, lookback_ids=SEAL_LOOKBACK_IDS):
            pass
    while batch.seal_pending(engine, NOW):
        pass
    with engine.begin() as conn:
        for op, x, y in tamper:
            a, b = ids[x % len(ids)], ids[y % len(ids)]
            for chain in (per_row, batch):
                present = {i for (i,) in conn.execute(sa.select(chain.entries.c.entry_id))}
                if op == "delete" and a in present:
                    conn.execute(chain.entries.delete().where(chain.entries.c.entry_id == a))
                elif op == "edit" and a in present:
                    edit(conn, chain, a, serial=f"X{y}")
                elif op == "swap" and a in present and b in present and a != b:
                    swap(conn, chain, a, b)

    def named(problems: list[str]) -> set[tuple[str, str]]:
        return {(p.split()[0], p.split()[1]) for p in problems} | {("kind", p.split()[2]) for p in problems}

    r_checked, r_problems, r_unsealed = verify(engine, per_row)
    b_checked, b_problems, b_unsealed = verify(engine, batch)
    assert (b_checked, b_unsealed) == (r_checked, r_unsealed) == (len(ids), 0)
    assert named(b_problems) == named(r_problems)
    assert bool(b_problems) == bool(r_problems)


# ---- the upgrade: a chain sealed per row by the code before, extended by batch seals ----

def _tamper_journal(engine: sa.Engine, table: str, id_col: str, ids: list[int], amount_col: str) -> None:
    with engine.begin() as conn:
        for stmt in drop_append_only_ddl(engine.dialect.name, table):
            conn.execute(sa.text(stmt))
        for i in ids:
            conn.execute(sa.text(f"UPDATE {table} SET {amount_col} = {amount_col} + 1 WHERE {id_col} = :i"), {"i": i})


# (chain, rows, migrate module, the downgrade target that undoes the batch seals' revision)
MIGRATED = [pytest.param((JOURNAL_CHAIN, _journal_rows, "mis_adapter.migrate", "0005_audit_seal_batches@-1"), id="mis"),
            # the revision before 0006_seals_batches: it and every later one (0007_pgcpu_journal_room) undone
            pytest.param((AUDIT_CHAIN, _audit_rows, "bridge.migrate", "0005_journal_lean_indexes"), id="bridge")]


def _migrated(engine: sa.Engine, module: str) -> Any:
    import importlib
    migrate = importlib.import_module(module)
    migrate.upgrade(engine)
    return migrate


@pytest.mark.parametrize("case", MIGRATED)
def test_a_chain_sealed_per_row_then_extended_by_batches_verifies_and_names_old_and_new_tampering(
        engine: sa.Engine, case: Any) -> None:
    chain, make_rows, module, _ = case
    _migrated(engine, module)
    ident = chain.entries.c[chain.id_column]
    rnd = random.Random(8)
    with engine.begin() as conn:
        conn.execute(chain.entries.insert(), make_rows(rnd, 12))
        assert seal_per_row_like_before(conn, chain) == 12
    with engine.begin() as conn:
        conn.execute(chain.entries.insert(), make_rows(rnd, 15))
        ids = [r[0] for r in conn.execute(sa.select(ident).order_by(ident))]
    assert [chain.seal_pending(engine, NOW, batch_max=10) for _ in range(3)] == [10, 5, 0]
    with engine.connect() as conn:
        assert chain.verify(conn) == (27, [], 0)
        first = conn.execute(sa.select(chain.batches.c.seal_no, chain.batches.c.prev_hash)
                             .order_by(chain.batches.c.seal_no).limit(1)).one()
        last_row_seal = conn.execute(sa.select(chain.seals.c.entry_hash).where(chain.seals.c.seal_no == 12)).scalar()
    assert tuple(first) == (13, last_row_seal)  # the batch seals continue the per-row chain
    _tamper_journal(engine, chain.entries.name, chain.id_column, [ids[3], ids[20]], "amount_fen")
    with engine.connect() as conn:
        checked, problems, unsealed = chain.verify(conn)
    assert (checked, unsealed) == (27, 0)
    assert problems == [f"entry {ids[3]} edited or reordered (seal 4)", f"entry {ids[20]} edited or reordered (seal 13)"]


@pytest.mark.parametrize("case", MIGRATED)
def test_downgrade_reseals_per_row_as_the_code_before_would_and_refuses_a_tampered_chain(
        engine: sa.Engine, case: Any) -> None:
    chain, make_rows, module, below = case
    migrate = _migrated(engine, module)
    ident = chain.entries.c[chain.id_column]
    rnd = random.Random(9)
    with engine.begin() as conn:
        conn.execute(chain.entries.insert(), make_rows(rnd, 23))
    assert [chain.seal_pending(engine, NOW, batch_max=10) for _ in range(4)] == [10, 10, 3, 0]
    migrate.downgrade(engine, below)
    with engine.connect() as conn:
        assert chain.batches.name not in sa.inspect(conn).get_table_names()
        rows = [dict(r) for r in conn.execute(sa.select(chain.entries).order_by(ident)).mappings()]
        seals = conn.execute(sa.select(chain.seals).order_by(chain.seals.c.seal_no)).mappings().all()
    expected = reference_chain(GENESIS, chain.columns, rows)
    assert [(s["seal_no"], s["entry_id"], s["prev_hash"], s["entry_hash"]) for s in seals] == [
        (k + 1, r[chain.id_column], p, h) for k, (r, p, h) in enumerate(zip(rows, [GENESIS, *expected[:-1]], expected, strict=True))]

    # upgraded again: the batch seals continue the chain; a tampered chain is not downgraded
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(chain.entries.insert(), make_rows(rnd, 4))
    assert chain.seal_pending(engine, NOW) == 4
    with engine.connect() as conn:
        assert chain.verify(conn) == (27, [], 0)
    ids = [r[chain.id_column] for r in rows]
    _tamper_journal(engine, chain.entries.name, chain.id_column, [ids[7]], "amount_fen")
    with pytest.raises(ChainTampered, match=f"entry {ids[7]} edited"):
        migrate.downgrade(engine, below)
    with engine.connect() as conn:
        assert chain.batches.name in sa.inspect(conn).get_table_names()
        assert conn.execute(sa.select(sa.func.count()).select_from(chain.seals)).scalar() == 23


# ---- the sealer: late rows, two sealers at once ----

ONE_WRITER = "SQLite has one writer at a time: no row commits after a higher id, no two sealers write at once"


@pytest.mark.parametrize("db_url", SERVERS, indirect=True)  # ONE_WRITER
def test_a_row_committed_late_with_a_lower_id_is_sealed_by_the_next_pass(engine: sa.Engine) -> None:
    chain = make_chain(sa.MetaData(), "tl")
    create(engine, chain)
    rnd = random.Random(4)
    with engine.connect() as slow:
        tx = slow.begin()
        slow.execute(chain.entries.insert(), _journal_rows(rnd, 1))  # takes the lowest id, commits last
        ids = add_rows(engine, chain, _journal_rows(rnd, 3))
        assert chain.seal_pending(engine, NOW, lookback_ids=SEAL_LOOKBACK_IDS) == 3
        tx.commit()
    late = set(add_rows(engine, chain, [])) - set(ids)
    assert len(late) == 1 and late.pop() < min(ids)
    assert chain.seal_pending(engine, NOW, lookback_ids=SEAL_LOOKBACK_IDS) == 1
    assert verify(engine, chain) == (4, [], 0)


@pytest.mark.parametrize("db_url", SERVERS, indirect=True)  # ONE_WRITER
def test_two_sealers_at_once_write_one_seal_and_every_entry_once(engine: sa.Engine, db_url: str) -> None:
    """The second sealer seals everything between the first's read of the head and its insert: the
    first's seal takes the same number, fails, and it seals nothing; the next pass finds nothing."""
    other = make_engine(db_url, pool_size=1)
    chain = make_chain(sa.MetaData(), "tc")
    create(engine, chain)
    add_rows(engine, chain, _journal_rows(random.Random(6), 7))
    results: list[int] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(f"INSERT INTO {chain.batches.name.upper()}") and not results:
            results.append(chain.seal_pending(other, NOW))

    sa.event.listen(engine, "before_cursor_execute", before)
    try:
        assert chain.seal_pending(engine, NOW) == 0
    finally:
        sa.event.remove(engine, "before_cursor_execute", before)
        other.dispose()
    assert results == [7]
    assert chain.seal_pending(engine, NOW) == 0
    assert verify(engine, chain) == (7, [], 0)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(chain.batches)).scalar() == 1


def test_a_full_pass_seals_a_late_row_below_the_window_even_after_a_sealed_row_was_deleted(engine: sa.Engine) -> None:
    """The full pass skips its walk of every seal when the entries up to the highest sealed id number
    as many as the seals name, with the same sum of ids; a deleted sealed entry (tampering) and a
    late unsealed one together must not cancel out."""
    chain = make_chain(sa.MetaData(), "tf")
    create(engine, chain)
    rnd = random.Random(2)
    rows = _journal_rows(rnd, 5)
    for k, row in enumerate(rows):
        row["entry_id"] = 5_000 + k
    add_rows(engine, chain, rows)
    assert chain.seal_pending(engine, NOW) == 5
    late = _journal_rows(rnd, 1)[0] | {"entry_id": 10}
    add_rows(engine, chain, [late])
    with engine.begin() as conn:
        conn.execute(chain.entries.delete().where(chain.entries.c.entry_id == 5_002))
    assert chain.seal_pending(engine, NOW, lookback_ids=100) == 0  # below the window
    assert chain.seal_pending(engine, NOW) == 1
    checked, problems, unsealed = verify(engine, chain)
    assert (checked, problems, unsealed) == (6, ["entry 5002 deleted (seal 1)"], 0)


def test_the_sealer_bounds_rows_per_seal_and_seals_per_pass_and_seals_everything_at_stop(engine: sa.Engine) -> None:
    """A background pass writes at most batches_per_pass seals of at most batch_max rows each (a backlog
    waits for later passes); the pass at stop seals the rest; the chain verifies."""
    chain = make_chain(sa.MetaData(), "tb")
    create(engine, chain)
    add_rows(engine, chain, _journal_rows(random.Random(6), 40))
    sealer = Sealer([(chain, engine)], 3600, lambda: NOW, batch_max=7, batches_per_pass=2)
    assert sealer.seal_once(SEAL_LOOKBACK_IDS, 2) == 14
    assert sealer.seal_once(SEAL_LOOKBACK_IDS, 2) == 14
    with engine.connect() as conn:
        counts = [n for (n,) in conn.execute(sa.select(chain.batches.c.entry_count).order_by(chain.batches.c.seal_no))]
    assert counts == [7, 7, 7, 7]
    assert verify(engine, chain) == (28, [], 12)
    assert sealer.seal_once() == 12  # what stop() runs last: no bound
    assert verify(engine, chain) == (40, [], 0)
    with pytest.raises(ValueError):
        Sealer([(chain, engine)], 1, lambda: NOW, batch_max=SEAL_BATCH_MAX + 1)


def test_a_sealer_stopping_while_its_database_is_unreachable_stops_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """The last pass at stop cannot reach the database (down, or its link dead): the stop goes on, so the
    process still closes its pools and exits cleanly, and the warning says the rows wait for a later pass.
    It used to raise out of the bridge's and mis_adapter's drain."""
    chain = make_chain(sa.MetaData(), "tu")
    unreachable = make_engine("postgresql://postgres@127.0.0.1:1/nowhere", pool_size=1)
    sealer = Sealer([(chain, unreachable)], 3600, lambda: NOW)
    sealer.start()
    try:
        sealer.stop()
    finally:
        unreachable.dispose()
    assert "event=audit_final_seal_failed error=OperationalError" in caplog.text
