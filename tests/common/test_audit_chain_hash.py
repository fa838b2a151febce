"""The sealer's hash is the same bytes as the per-column form it replaced, so chains sealed before
keep verifying: `chain_hashes` (rows as tuples, one %-format per row) against the original
`entry_hash` (rows as mappings, one f-string per column, copied here verbatim as the reference),
over random rows of every value type a driver hands back; the batch seals' per-entry digests are
SHA-256 of that same per-column text; and, on SQLite, PostgreSQL and MariaDB, every batch seal
`seal_pending` writes (numbers, ids, digests, links, hashes, across seals) against the reference
recomputed from the rows as the database returns them."""
from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.journal.audit_chain import AUDIT_CHAIN
from mis_adapter.db.audit import JOURNAL_CHAIN
from yindian_common.audit_chain import GENESIS, Chain, chain_hashes, entry_digests, unpack_ids
from yindian_common.db import make_engine

# ---- the reference: the per-row hash as sealed before (yindian_common/audit_chain.py at 8e416f7) ----


def reference_canonical(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return str(value)
    if value is None:
        return "\x00null"
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def reference_entry_hash(prev_hash: str, columns: list[str], row: Any) -> str:
    text = "".join(f"\x1f{c}={reference_canonical(row[c])}" for c in columns)
    return hashlib.sha256(prev_hash.encode() + text.encode("utf-8")).hexdigest()


def reference_chain(prev: str, columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        prev = reference_entry_hash(prev, columns, row)
        out.append(prev)
    return out


# ---- property: every value type, any column names ----

ZONES = st.sampled_from([None, dt.UTC, dt.timezone(dt.timedelta(hours=8)), dt.timezone(dt.timedelta(hours=-5, minutes=-30)),
                         dt.timezone(dt.timedelta(seconds=1))])
VALUES = st.one_of(
    st.text(), st.text(alphabet="%s=\x1f\x00{}"), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.none(), st.booleans(), st.datetimes(timezones=ZONES), st.dates(), st.times(),
    st.binary(), st.binary().map(bytearray), st.binary().map(lambda b: memoryview(b)),
    st.decimals(allow_nan=False), st.floats(allow_nan=False), st.uuids(),
)
COLUMN_NAMES = st.lists(st.text(alphabet="abc_%s={}\x1f", min_size=1, max_size=6), min_size=1, max_size=8,
                        unique=True).map(sorted)


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[str], list[list[Any]]]:
    columns = draw(COLUMN_NAMES)
    rows = draw(st.lists(st.lists(VALUES, min_size=len(columns), max_size=len(columns)), max_size=6))
    return columns, rows


@settings(max_examples=400, deadline=None)
@given(table=tables(), prev=st.one_of(st.just(GENESIS), st.text(alphabet="0123456789abcdef", min_size=64,
                                                                   max_size=64)))
def test_chain_hashes_equal_the_per_column_form_for_every_value_type(table: tuple[list[str], list[list[Any]]],
                                                                      prev: str) -> None:
    columns, rows = table
    mappings = [dict(zip(columns, r, strict=True)) for r in rows]
    assert chain_hashes(prev, columns, [tuple(r) for r in rows]) == reference_chain(prev, columns, mappings)


def test_a_subclass_of_str_or_int_is_canonicalised_as_before() -> None:
    class Tag(str):
        def __str__(self) -> str:
            return "tag!"

    class Small(int):
        def __str__(self) -> str:
            return "small!"

    row = (Tag("x"), Small(3), True, 7)
    cols = ["a", "b", "c", "d"]
    assert chain_hashes(GENESIS, cols, [row]) == reference_chain(GENESIS, cols, [dict(zip(cols, row, strict=True))])


# ---- in the databases: what seal_pending writes is the reference over the rows as read back ----

@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = make_engine(db_url, pool_size=2)
    yield eng
    eng.dispose()


def _journal_rows(rnd: random.Random, n: int) -> list[dict[str, Any]]:
    base = dt.datetime(2026, 11, 29, 1, 2, 3, tzinfo=dt.UTC)
    return [{"at": base + dt.timedelta(microseconds=rnd.randrange(10**12)), "bank_id": rnd.choice(["ICBC", "ABC", "ZZB"]),
             "rpc": rnd.choice(["PAY", "CANCEL", "DEBIT", "RECONCILE"]), "serial": f"S-{i}-{rnd.randrange(10**9)}",
             "original_serial": rnd.choice(["", "原-1", "O%s=1"]), "account_no": f"{rnd.randrange(10**10):010d}",
             "amount_fen": rnd.randrange(-10**12, 10**12), "outcome": rnd.choice(["POSTED", "REVERSED", "已冲正"]),
             "payment_id": rnd.choice([None, rnd.randrange(1, 2**62)])} for i in range(n)]


def _audit_rows(rnd: random.Random, n: int) -> list[dict[str, Any]]:
    base = dt.datetime(2026, 11, 29, 23, 59, 59, 999_999, tzinfo=dt.UTC)
    return [{"at": base - dt.timedelta(microseconds=rnd.randrange(10**12)), "kind": rnd.choice(["PAY", "CANCEL"]),
             "serial": f"B{i}", "bank_id": "ICBC", "amount_fen": rnd.randrange(0, 10**10),
             "state": rnd.choice(["POSTED", "SUSPECT"]), "status_code": rnd.choice([None, 0, 14]),
             "detail": rnd.choice(["", "in doubt: UNAVAILABLE: 连接中断", "50% {x}"])} for i in range(n)]


def reference_digest(columns: list[str], row: Any) -> bytes:
    """A batch seal's per-entry digest: SHA-256 of the row's canonical form (the per-row text above)."""
    return hashlib.sha256("".join(f"\x1f{c}={reference_canonical(row[c])}" for c in columns).encode("utf-8")).digest()


def reference_seal_hash(prev: str, columns: str, ids: list[int], digests: bytes) -> str:
    ids_blob = b"".join(i.to_bytes(8, "big", signed=True) for i in ids)
    return hashlib.sha256(prev.encode() + b"\x1e" + columns.encode() + b"\x1e" + ids_blob + digests).hexdigest()


@settings(max_examples=200, deadline=None)
@given(table=tables())
def test_entry_digests_are_the_sha256_of_the_per_column_form(table: tuple[list[str], list[list[Any]]]) -> None:
    columns, rows = table
    expected = b"".join(reference_digest(columns, dict(zip(columns, r, strict=True))) for r in rows)
    assert entry_digests(columns, [tuple(r) for r in rows]) == expected


@pytest.mark.parametrize("chain,make_rows", [(JOURNAL_CHAIN, _journal_rows), (AUDIT_CHAIN, _audit_rows)],
                         ids=["mis-journal", "bridge-audit"])
def test_seals_written_are_the_reference_digests_of_the_rows(engine: sa.Engine, chain: Chain, make_rows: Any) -> None:
    with engine.begin() as conn:
        for table in (chain.entries, chain.seals, chain.batches):
            table.create(conn)
        conn.execute(chain.entries.insert(), make_rows(random.Random(11), 57))
    now = dt.datetime(2026, 11, 30, 0, 0, 1, tzinfo=dt.UTC)
    sealed = []
    while n := chain.seal_pending(engine, now, batch_max=10):  # six seals: the chain crosses seals
        sealed.append(n)
    assert sealed == [10, 10, 10, 10, 10, 7]
    columns = chain.columns
    ident = chain.entries.c[chain.id_column]
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(chain.entries).order_by(ident)).mappings()]
        seals = conn.execute(sa.select(chain.batches).order_by(chain.batches.c.seal_no)).mappings().all()
        checked, problems, unsealed = chain.verify(conn)
    ids = [r[chain.id_column] for r in rows]
    assert [s["seal_no"] for s in seals] == list(range(1, 7))
    prev = GENESIS
    for k, seal in enumerate(seals):
        part = rows[10 * k:10 * (k + 1)]
        assert unpack_ids(bytes(seal["entry_ids"])) == tuple(ids[10 * k:10 * (k + 1)])
        assert seal["last_entry_id"] == part[-1][chain.id_column] and seal["entry_count"] == len(part)
        digests = b"".join(reference_digest(columns, r) for r in part)
        assert bytes(seal["digests"]) == digests
        assert seal["columns"] == ",".join(columns)
        assert seal["prev_hash"] == prev
        assert seal["seal_hash"] == reference_seal_hash(prev, ",".join(columns), ids[10 * k:10 * (k + 1)], digests)
        assert seal["sealed_at"].replace(tzinfo=seal["sealed_at"].tzinfo or dt.UTC) == now
        prev = seal["seal_hash"]
    assert (checked, problems, unsealed) == (57, [], 0)


def test_verify_names_each_tampered_entry_reading_a_page_of_entries_per_round_trip(
        engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator's `audit verify` over a long journal: the edited and the deleted entries are named,
    across page boundaries, and the entries are read one query per page of VERIFY_FETCH_ROWS, not one
    per entry (20,000 rows took over 10 s of round trips that way)."""
    import yindian_common.audit_chain as audit_chain
    monkeypatch.setattr(audit_chain, "VERIFY_FETCH_ROWS", 10)
    chain = JOURNAL_CHAIN
    ident = chain.entries.c[chain.id_column]
    with engine.begin() as conn:
        for table in (chain.entries, chain.seals, chain.batches):
            table.create(conn)
        conn.execute(chain.entries.insert(), _journal_rows(random.Random(5), 57))
    now = dt.datetime(2026, 11, 30, 0, 0, 1, tzinfo=dt.UTC)
    while chain.seal_pending(engine, now, batch_max=25):
        pass
    with engine.begin() as conn:
        ids = [r[0] for r in conn.execute(sa.select(ident).order_by(ident))]
        conn.execute(chain.entries.delete().where(ident == ids[10]))          # first entry of a page
        conn.execute(chain.entries.update().where(ident == ids[41]).values(amount_fen=1))  # an edited amount
    statements: list[str] = []
    with engine.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute", lambda *a: statements.append(a[2]))
        checked, problems, unsealed = chain.verify(conn)
    assert (checked, unsealed) == (57, 0)
    assert problems == [f"entry {ids[10]} deleted (seal 1)", f"entry {ids[41]} edited or reordered (seal 2)"]
    # 1 (empty) page of per-row seals, 3 seals + 1 empty read, 3 + 3 + 1 pages of entries, 1 count.
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 13
