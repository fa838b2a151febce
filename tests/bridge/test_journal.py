"""The bridge journal on SQLite, PostgreSQL and MariaDB: one row per serial,
outcomes recorded in group commits with an append-only audit, crash
recovery of PENDING rows, the resolver's due order (reversals first) and
the in-doubt count reconciliation relies on."""
from __future__ import annotations

import datetime as dt
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bridge import journal as jn
from bridge.journal import Claims, Entry, Journal, JournalWriter
from tests.conftest import SERVERS
from yindian_common.clock import ManualClock
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(60)

AT = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)
DAY = dt.date(2026, 11, 28)
WAIT_S = 10.0



def pay(serial: str, amount_fen: int = 1_000, **over: object) -> Entry:
    fields: dict[str, object] = {"kind": jn.PAY, "serial": serial, "bank_id": "ICBC", "amount_fen": amount_fen,
                                 "state": jn.PENDING, "business_date": DAY, "created_at": AT, "updated_at": AT,
                                 "account_no": "0100000017", "outlet_code": "O1", "teller_id": "T1", "channel": 1}
    fields.update(over)
    return Entry(**fields)  # type: ignore[arg-type]


def cancel(serial: str, original: str) -> Entry:
    return Entry(kind=jn.CANCEL, serial=serial, bank_id="ICBC", amount_fen=1_000, state=jn.PENDING,
                 business_date=DAY, created_at=AT, updated_at=AT, original_serial=original, reason="r")


def test_one_row_per_serial_and_the_first_parameters_win(engine: Engine) -> None:
    j = Journal(engine)
    assert j.insert_new(pay("S1", 1_000))
    assert not j.insert_new(pay("S1", 2_000))
    got = j.get(jn.PAY, "S1")
    assert got is not None and got.amount_fen == 1_000 and got.state == jn.PENDING
    assert got.same_request(pay("S1", 1_000)) and not got.same_request(pay("S1", 2_000))
    assert j.insert_new(cancel("S1", "S0")), "pays and cancels have separate serial spaces"
    assert j.get(jn.PAY, "nope") is None


def test_writer_records_outcomes_with_an_audit_line_and_releases_claims(engine: Engine) -> None:
    j, claims = Journal(engine), Claims()
    writer = JournalWriter(j, claims, ManualClock(AT), batch_max=8, queue_max=64, idle_wait_s=0.05)
    writer.start()
    try:
        held = []
        for i in range(20):
            e = pay(f"W{i}")
            j.insert_new(e)
            claim, owned = claims.acquire(e.key)
            assert owned
            held.append(claim)
            writer.submit(jn.outcome_for(e, jn.POSTED, AT, status_code=0, body=b"\x01resp"), claim)
        assert writer.flush(WAIT_S)
        assert all(c.released.is_set() for c in held) and len(claims) == 0
        assert j.counts_by_state() == {jn.POSTED: 20}
        row = j.get(jn.PAY, "W7")
        assert row is not None and row.body == b"\x01resp" and row.status_code == 0
        e = pay("W7")
        writer.submit(jn.outcome_for(e, jn.NOT_APPLIED, AT, message="x" * 999), None)
        assert writer.flush(WAIT_S)
        lines = j.audit_lines(jn.PAY, "W7")
        assert [line["state"] for line in lines] == [jn.POSTED, jn.NOT_APPLIED]
        assert len(lines[1]["detail"]) == jn.MESSAGE_MAX
    finally:
        writer.stop(WAIT_S)


def test_writer_journals_new_rows_in_group_commits(engine: Engine) -> None:
    j, claims = Journal(engine), Claims()
    j.insert_new(pay("OLD", 5_000))
    writer = JournalWriter(j, claims, ManualClock(AT), batch_max=16, queue_max=64, idle_wait_s=0.05)
    rows = []
    for serial in ("OLD", "N1", "N2"):
        claim, _ = claims.acquire((jn.PAY, serial))
        rows.append(writer.journal_new(pay(serial), claim))
    claim, _ = claims.acquire((jn.PAY, "GAVE-UP"))
    gave_up = writer.journal_new(pay("GAVE-UP"), claim)
    assert not gave_up.wait(0.0), "nothing is written before the writer runs"
    writer.start()
    try:
        assert all(r.wait(WAIT_S) for r in rows)
        assert [r.inserted for r in rows] == [False, True, True]
        assert j.get(jn.PAY, "OLD").amount_fen == 5_000  # type: ignore[union-attr]
        assert writer.flush(WAIT_S) and writer.flush(WAIT_S)
        # A row journaled after its caller gave up is in doubt, and its claim is let go.
        assert j.get(jn.PAY, "GAVE-UP").state == jn.SUSPECT  # type: ignore[union-attr]
        assert claim.released.is_set()
    finally:
        writer.stop(WAIT_S)


def test_pending_rows_become_suspect_at_start_up(engine: Engine) -> None:
    j = Journal(engine)
    j.insert_new(pay("P1"))
    j.insert_new(pay("P2"))
    j.insert_new(cancel("C1", "P0"))
    j.record([jn.outcome_for(pay("P2"), jn.POSTED, AT, status_code=0, body=b"r")])
    assert j.recover_orphans(AT) == 2
    assert j.counts_by_state() == {jn.SUSPECT: 2, jn.POSTED: 1}
    assert [line["state"] for line in j.audit_lines(jn.PAY, "P1")] == [jn.SUSPECT]
    assert j.recover_orphans(AT) == 0


def test_due_rows_put_reversals_before_probes_and_respect_backoff(engine: Engine) -> None:
    j = Journal(engine)
    for e in (pay("PROBE"), pay("REV"), cancel("CX", "PX"), pay("LATER"), pay("DONE")):
        j.insert_new(e)
    j.record([
        jn.outcome_for(pay("PROBE"), jn.SUSPECT, AT, next_attempt_ms=100),
        jn.outcome_for(pay("REV"), jn.REVERSING, AT, next_attempt_ms=500, reversal_serial="BRV-1"),
        jn.outcome_for(cancel("CX", "PX"), jn.SUSPECT, AT, next_attempt_ms=400),
        jn.outcome_for(pay("LATER"), jn.SUSPECT, AT, next_attempt_ms=10_000),
        jn.outcome_for(pay("DONE"), jn.POSTED, AT, status_code=0, body=b"r"),
    ])
    assert j.due(1_000, 10) == [(jn.CANCEL, "CX"), (jn.PAY, "REV"), (jn.PAY, "PROBE")]
    assert j.due(1_000, 1) == [(jn.CANCEL, "CX")]
    assert j.due(20_000, 10)[-1] == (jn.PAY, "LATER")
    assert j.due(50, 10) == []


def test_in_doubt_count_is_per_business_date(engine: Engine) -> None:
    j = Journal(engine)
    j.insert_new(pay("A"))
    j.insert_new(pay("B"))
    j.insert_new(pay("OTHER-DAY", business_date=DAY + dt.timedelta(days=1)))
    j.insert_new(cancel("C", "A"))
    j.record([jn.outcome_for(pay("B"), jn.POSTED, AT, status_code=0, body=b"r"),
              jn.outcome_for(cancel("C", "A"), jn.SUSPECT, AT)])
    assert j.in_doubt_count(DAY) == 2
    assert j.in_doubt_count(DAY + dt.timedelta(days=1)) == 1
    assert j.in_doubt_count(DAY - dt.timedelta(days=1)) == 0
    assert [c.serial for c in j.cancels_of("A")] == ["C"]


def _head() -> list[str]:
    from alembic.script import ScriptDirectory

    from bridge.migrate import alembic_config
    return list(ScriptDirectory.from_config(alembic_config()).get_heads())


def test_migrations_are_exactly_the_journal_schema(engine: Engine) -> None:
    """The tables the revisions create are the ones the code declares: nothing for autogenerate to add."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": "bridge_alembic_version"})
        diffs = compare_metadata(ctx, jn.metadata)
        version = conn.execute(sa.text("SELECT version_num FROM bridge_alembic_version")).scalars().all()
    assert diffs == []
    assert version == _head() == ["0008_journalpg_audit_lean"]


def test_a_journal_created_before_migrations_is_stamped_and_keeps_its_rows(db_url: str) -> None:
    """A bridge journal made by the old create_all (exactly revision 0001's tables) still starts: it is
    stamped 0001 and upgraded, its rows kept (their caller unknown: '')."""
    from alembic import command

    from bridge.migrate import alembic_config
    eng = make_engine(db_url, pool_size=2)
    try:
        cfg = alembic_config()
        with eng.begin() as conn:  # what every bridge's create_all made before bridge/migrations existed
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
            conn.execute(sa.text("DROP TABLE bridge_alembic_version"))
            conn.execute(sa.text(
                "INSERT INTO bridge_journal (kind, serial, bank_id, account_no, original_serial, amount_fen, "
                "outlet_code, teller_id, channel, reason, state, message, attempts, next_attempt_ms, "
                "business_date, created_at, updated_at) VALUES ('PAY', 'OLD1', 'ICBC', '0100000017', '', 4200, "
                "'O1', 'T1', 1, '', 'PENDING', '', 0, 0, :day, :at, :at)"), {"day": DAY, "at": AT})
        jn.create_schema(eng)
        jn.create_schema(eng)  # and every later start is a no-op
        got = Journal(eng).get(jn.PAY, "OLD1")
        assert got is not None and got.amount_fen == 4_200 and got.state == jn.PENDING and got.caller == ""
        assert Journal(eng).insert_new(pay("NEW1", 100, caller="ICBC"))
        assert Journal(eng).get(jn.PAY, "NEW1").caller == "ICBC"  # type: ignore[union-attr]
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM bridge_alembic_version")).scalars().all() == _head()
    finally:
        eng.dispose()


def test_entry_and_outcome_share_their_answer_fields() -> None:
    e = pay("S9", 700, status_code=5, message="m", attempts=2, next_attempt_ms=9)
    o = jn.outcome_for(e, jn.SUSPECT, AT)
    assert isinstance(o, jn.Recorded) and isinstance(e, jn.Recorded)
    assert (o.key, o.amount_fen, o.status_code, o.message, o.attempts, o.next_attempt_ms) == (
        e.key, 700, 5, "m", 2, 9)


def as_utc(at: dt.datetime) -> dt.datetime:
    """SQLite and MariaDB keep the UTC wall time only."""
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)


def test_a_group_commit_keeps_every_byte_and_character_of_rows_and_outcomes(engine: Engine) -> None:
    """PostgreSQL writes a group commit as one statement with JSON parameters: nothing may be lost in it."""
    journal = Journal(engine)
    first = [pay(f"BYTES-{i}", amount_fen=10**12 + i, bank_balance_fen=None if i % 2 else 10**15)
             for i in range(3)]
    assert journal.write(first, []) == {e.key for e in first}
    body = bytes(range(256))
    message = '冲正 "quoted" \\ back\\slash \u00e9'
    outcomes = [jn.outcome_for(e, jn.POSTED, AT + dt.timedelta(seconds=1), status_code=0, body=body,
                               message=message, attempts=2**31 - 1, next_attempt_ms=2**62) for e in first]
    late = pay("BYTES-late", reason="原因")
    assert journal.write([late, first[0]], outcomes) == {late.key}
    for e in first:
        row = journal.get(*e.key)
        assert row is not None and row.state == jn.POSTED and row.body == body and row.message == message
        assert (row.amount_fen, row.bank_balance_fen, row.attempts, row.next_attempt_ms) == (
            e.amount_fen, e.bank_balance_fen, 2**31 - 1, 2**62)
        assert as_utc(row.updated_at) == AT + dt.timedelta(seconds=1) and as_utc(row.created_at) == AT
        assert row.business_date == DAY
        assert [(a["state"], a["detail"]) for a in journal.audit_lines(*e.key)] == [(jn.POSTED, message)]
    stored = journal.get(*late.key)
    assert stored is not None and stored.same_request(late) and stored.state == jn.PENDING


def _drop_other_connections(engine: Engine) -> None:
    """Ends every other session on the test's database, as a server restart or a network cut would."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        else:
            ids = conn.execute(sa.text("SELECT id FROM information_schema.processlist "
                                       "WHERE db = DATABASE() AND id <> CONNECTION_ID()")).scalars().all()
            for pid in ids:
                conn.execute(sa.text(f"KILL {int(pid)}"))
        conn.commit()


@pytest.mark.parametrize("db_url", SERVERS, indirect=True)  # SQLite has no server connection to cut
def test_the_writer_journals_on_after_its_connection_is_cut(engine: Engine) -> None:
    j, claims = Journal(engine), Claims()
    writer = JournalWriter(j, claims, ManualClock(AT), batch_max=16, queue_max=64, idle_wait_s=0.05)
    writer.start()
    try:
        first = writer.journal_new(pay("BEFORE"), claims.acquire((jn.PAY, "BEFORE"))[0])
        assert first.wait(WAIT_S) and first.inserted
        _drop_other_connections(engine)  # the writer's kept connection among them
        claim = claims.acquire((jn.PAY, "AFTER"))[0]
        after = writer.journal_new(pay("AFTER"), claim)
        assert after.wait(WAIT_S) and after.inserted, "the writer retries on a new connection"
        rec = writer.submit(jn.outcome_for(pay("AFTER"), jn.POSTED, AT, status_code=0, body=b"ok", message=""),
                            claim, waited=True)
        assert rec.wait(WAIT_S)
        got = j.get(jn.PAY, "AFTER")
        assert got is not None and got.state == jn.POSTED and got.body == b"ok"
    finally:
        writer.stop(WAIT_S)


def test_what_arrives_while_the_idle_writer_lingers_shares_its_commit(engine: Engine) -> None:
    """Batching by time: woken from idle by one pay's row, the writer waits commit_linger_s; another
    pay's row and a third pay's outcome arriving meanwhile go in the same commit (one transaction)."""
    j, claims = Journal(engine), Claims()
    j.insert_new(pay("DONE"))
    waits: list[float] = []
    late: list[object] = []

    def linger(seconds: float) -> None:  # the writer's wait: two more pays' work arrives during it
        waits.append(seconds)
        if not late:
            late.append(writer.journal_new(pay("L2"), claims.acquire((jn.PAY, "L2"))[0]))
            late.append(writer.submit(jn.outcome_for(pay("DONE"), jn.POSTED, AT, status_code=0, body=b"r"),
                                      claims.acquire((jn.PAY, "DONE"))[0], waited=True))

    writer = JournalWriter(j, claims, ManualClock(AT), batch_max=16, queue_max=64, idle_wait_s=0.05,
                           commit_linger_s=0.002, sleep=linger)
    writer.start()
    try:
        first = writer.journal_new(pay("L1"), claims.acquire((jn.PAY, "L1"))[0])
        assert first.wait(WAIT_S) and first.inserted
        assert all(x.wait(WAIT_S) for x in late)  # type: ignore[attr-defined]
        assert waits == [0.002]
        assert writer.transactions == 1 and writer.rows_written == 2 and writer.outcomes_written == 1
        assert [j.get(jn.PAY, s).state for s in ("L1", "L2", "DONE")] == [  # type: ignore[union-attr]
            jn.PENDING, jn.PENDING, jn.POSTED]
        assert len(claims) == 2, "the outcome's claim is released once durable; the new rows' are the callers'"
    finally:
        writer.stop(WAIT_S)


def _paced_pays(engine: Engine, gap_s: float, n: int) -> tuple[list[float], JournalWriter]:
    """`n` pays journaled one after another, each alone, `gap_s` apart on the writer's clock; returns the
    writer's commit lingers while it journaled them (it is stopped)."""
    j, claims = Journal(engine), Claims()
    now = [0.0]
    waits: list[float] = []
    writer = JournalWriter(j, claims, ManualClock(AT), batch_max=16, queue_max=64, idle_wait_s=0.05,
                           commit_linger_s=0.002, sleep=waits.append, monotonic=lambda: now[0])
    writer.start()
    try:
        for i in range(n):
            now[0] += gap_s
            row = writer.journal_new(pay(f"PACE{i}"), claims.acquire((jn.PAY, f"PACE{i}"))[0])
            assert row.wait(WAIT_S) and row.inserted
        lingered = list(waits)
    finally:
        writer.stop(WAIT_S)
    assert writer.transactions == n and writer.rows_written == n
    assert all(j.get(jn.PAY, f"PACE{i}") is not None for i in range(n))
    return lingered, writer


def test_at_a_quiet_pace_the_writer_commits_at_once_instead_of_lingering_for_nobody(engine: Engine) -> None:
    """One pay a second (a quiet counter): after the first wake (no rate known yet) no row waits the
    commit linger, since no other work is expected within it."""
    waits, _ = _paced_pays(engine, gap_s=1.0, n=5)
    assert waits == [0.002]


def test_at_a_busy_pace_the_idle_writer_still_lingers_for_company(engine: Engine) -> None:
    """Work arriving every 0.1 ms (10,000 items a second, 20 expected within a 2 ms linger): each wake
    from idle lingers, as before the rate was taken into account."""
    waits, _ = _paced_pays(engine, gap_s=0.0001, n=5)
    assert waits == [0.002] * 5


def test_concurrent_pays_share_commits_and_every_one_is_journaled_once(engine: Engine) -> None:
    """32 threads journal a row, then its outcome, waiting for each as the bridge does: every caller is
    answered, every row is POSTED with one audit line, every claim is released, and commits were shared."""
    import threading
    j, claims = Journal(engine), Claims()
    writer = JournalWriter(j, claims, ManualClock(AT), batch_max=16, queue_max=64, idle_wait_s=0.05)
    writer.start()
    serials = [f"C{i:02d}" for i in range(32)]
    results: dict[str, tuple[bool, bool, bool]] = {}
    go = threading.Barrier(len(serials))

    def one(serial: str) -> None:
        claim = claims.acquire((jn.PAY, serial))[0]
        go.wait()
        row = writer.journal_new(pay(serial), claim)
        written = row.wait(WAIT_S)
        rec = writer.submit(jn.outcome_for(pay(serial), jn.POSTED, AT, status_code=0, body=serial.encode()),
                            claim, waited=True)
        results[serial] = (written, row.inserted, rec.wait(WAIT_S))

    threads = [threading.Thread(target=one, args=(s,)) for s in serials]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 3)
        assert results == {s: (True, True, True) for s in serials}
        for s in serials:
            got = j.get(jn.PAY, s)
            assert got is not None and got.state == jn.POSTED and got.body == s.encode()
            assert [a["state"] for a in j.audit_lines(jn.PAY, s)] == [jn.POSTED]
        assert len(claims) == 0
        assert writer.rows_written == 32 and writer.outcomes_written == 32
        assert writer.transactions < 64, "commits are shared"
    finally:
        writer.stop(WAIT_S)


def _hold_journal_lock(engine: Engine) -> sa.Connection:
    """Another session locks the journal table: the writer's statements wait behind it."""
    conn = engine.connect()
    if engine.dialect.name == "postgresql":
        conn.execute(sa.text(f"LOCK TABLE {jn.requests.name} IN ACCESS EXCLUSIVE MODE"))
    else:
        conn.execute(sa.text(f"LOCK TABLES {jn.requests.name} WRITE"))
    return conn


def _other_sessions(engine: Engine, holder: sa.Connection) -> list[int]:
    me = holder.execute(sa.text("SELECT pg_backend_pid()" if engine.dialect.name == "postgresql"
                                else "SELECT CONNECTION_ID()")).scalar_one()
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            sql = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                   "AND pid <> pg_backend_pid() AND pid <> :me AND wait_event_type = 'Lock'")
        else:
            sql = ("SELECT id FROM information_schema.processlist WHERE db = DATABASE() "
                   "AND id <> CONNECTION_ID() AND id <> :me AND state LIKE '%lock%'")
        return [int(p) for p in conn.execute(sa.text(sql), {"me": me}).scalars().all()]


@pytest.mark.parametrize("db_url", SERVERS, indirect=True)  # SQLite: no server session to lock and cut
def test_a_commit_cut_while_the_journal_is_locked_is_retried_and_its_caller_gives_up(engine: Engine) -> None:
    """A pay's row is being committed while the journal is locked, and the committing connection is
    then cut mid-batch: the caller gives up at its deadline (the bridge's journal_slow path: not
    forwarded), the writer retries on a new connection, and once the journal is free the row is
    journaled, recorded SUSPECT (nobody will forward or answer it: the resolver settles it) and its
    claim let go."""
    import threading
    import time
    j, claims = Journal(engine), Claims()
    writer = JournalWriter(j, claims, ManualClock(AT), batch_max=16, queue_max=64, idle_wait_s=0.05)
    writer.start()
    holder = _hold_journal_lock(engine)
    try:
        claim = claims.acquire((jn.PAY, "LOCKED"))[0]
        row = writer.journal_new(pay("LOCKED"), claim)
        answer: list[bool] = []
        caller = threading.Thread(target=lambda: answer.append(row.wait(3.0)))
        caller.start()
        blocked: list[int] = []
        deadline = time.monotonic() + WAIT_S
        while not blocked and time.monotonic() < deadline:  # until the caller's commit waits on the lock
            blocked = _other_sessions(engine, holder)
        assert blocked, "the commit waits behind the lock"
        with engine.connect() as conn:
            for pid in blocked:
                conn.execute(sa.text("SELECT pg_terminate_backend(:p)" if engine.dialect.name == "postgresql"
                                     else f"KILL {pid}"), {"p": pid})
            conn.commit()
        caller.join(WAIT_S)
        assert answer == [False], "the caller gives up at its deadline"
        assert not claim.released.is_set(), "the writer holds the claim of a row it may still write"
    finally:
        if engine.dialect.name != "postgresql":
            holder.execute(sa.text("UNLOCK TABLES"))
        holder.rollback()
        holder.close()
    try:
        assert claim.released.wait(WAIT_S)
        assert writer.flush(WAIT_S)
        got = j.get(jn.PAY, "LOCKED")
        assert got is not None and got.state == jn.SUSPECT
        assert [a["state"] for a in j.audit_lines(jn.PAY, "LOCKED")] == [jn.SUSPECT]
    finally:
        writer.stop(WAIT_S)


def test_a_group_commit_with_a_journaled_serial_leaves_it_alone_and_writes_the_rest(engine: Engine) -> None:
    """A retried serial reaches the writer beside new rows and other pays' outcomes (on PostgreSQL one
    statement): the journaled row keeps its parameters and state, the new rows and outcomes are written."""
    journal = Journal(engine)
    old, settled = pay("OLD", 5_000), pay("SETTLED", 3_000)
    assert journal.write([old, settled], []) == {old.key, settled.key}
    new = [pay("NEW1", 100), pay("NEW2", 200)]
    outcome = jn.outcome_for(settled, jn.POSTED, AT, status_code=0, body=b"answer", message="")
    assert journal.write([new[0], pay("OLD", 9_999), new[1]], [outcome]) == {e.key for e in new}
    stored = journal.get(*old.key)
    assert stored is not None and stored.amount_fen == 5_000 and stored.state == jn.PENDING
    assert [(e.serial, e.amount_fen, e.state) for e in (journal.get(*k.key) for k in new) if e is not None] == [
        ("NEW1", 100, jn.PENDING), ("NEW2", 200, jn.PENDING)]
    got = journal.get(*settled.key)
    assert got is not None and got.state == jn.POSTED and got.body == b"answer"
    assert [a["state"] for a in journal.audit_lines(*settled.key)] == [jn.POSTED]
    assert journal.audit_lines(*old.key) == []


def test_a_serial_another_session_journals_meanwhile_is_answered_as_journaled(pg_url: str) -> None:
    """Only the writer inserts, so its statement skips journaled serials without ON CONFLICT; should
    another session insert the same serial concurrently, the writer's statement fails on the key and
    the writer retries it: the caller learns the serial was journaled, whose parameters stay."""
    engine = make_engine(pg_url, pool_size=4)
    jn.create_schema(engine)
    j, claims = Journal(engine), Claims()
    writer = JournalWriter(j, claims, ManualClock(AT), batch_max=16, queue_max=64, idle_wait_s=0.05)
    writer.start()
    other = engine.connect()
    try:
        other.execute(jn.requests.insert(), pay("RACE", 7_000).row())  # uncommitted: the writer waits on it
        row = writer.journal_new(pay("RACE", 1_000), claims.acquire((jn.PAY, "RACE"))[0])
        waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                          "AND application_name = 'bridge/journal-writer' AND wait_event_type = 'Lock'")
        deadline = time.monotonic() + WAIT_S
        with engine.connect() as probe:
            while not probe.execute(waiting).scalar_one():
                assert time.monotonic() < deadline, "the writer never waited on the other session's row"
                probe.rollback()
                time.sleep(0.01)
        other.commit()
        assert row.wait(WAIT_S) and not row.inserted
        got = j.get(jn.PAY, "RACE")
        assert got is not None and got.amount_fen == 7_000 and got.state == jn.PENDING
    finally:
        other.close()
        writer.stop(WAIT_S)
        engine.dispose()


def test_by_default_a_row_arriving_while_the_idle_writer_lingers_shares_its_commit(engine: Engine) -> None:
    """The bridge's default settings batch by time: a second pay's row arriving while the writer, woken
    by the first, lingers goes in the same commit (one transaction for both rows)."""
    from bridge.settings import BridgeSettings

    j, claims = Journal(engine), Claims()
    late: list[object] = []

    def linger(_seconds: float) -> None:
        if not late:
            late.append(writer.journal_new(pay("D2"), claims.acquire((jn.PAY, "D2"))[0]))

    writer = JournalWriter(j, claims, ManualClock(AT), batch_max=16, queue_max=64, idle_wait_s=0.05,
                           commit_linger_s=BridgeSettings().journal_commit_linger_s, sleep=linger)
    writer.start()
    try:
        first = writer.journal_new(pay("D1"), claims.acquire((jn.PAY, "D1"))[0])
        assert first.wait(WAIT_S) and first.inserted
        assert late and late[0].wait(WAIT_S) and late[0].inserted  # type: ignore[attr-defined]
        assert writer.transactions == 1 and writer.rows_written == 2
    finally:
        writer.stop(WAIT_S)
