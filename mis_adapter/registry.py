"""The front database's serial registry: each bank's one serial space across
branch databases (the role of the seed's front-end processor). Storage only:
short transactions on the front database, each its own commit.

The protocol (mis_adapter.cross_branch runs it):

    claim (front)  ->  post in the home branch (the serial unique there too)  ->  settle (front)

- A claim names the serial's home branch. Whoever claims first decides where
  the serial lives; every later Pay, replay, Cancel or GetPayment of it goes
  to that branch, where the branch's own unique key (bank, serial) and
  account locks settle the races exactly as with one database.
- A claim with nothing in its branch means "nothing written" to every reader
  (GetPayment NOT_FOUND; a retry posts it; a cancel tombstones it there). So
  a crash between claim and branch commit loses nothing, and one after the
  branch commit leaves a claim that `recover` (or the retry) settles.
- A CLAIMED row whose branch refused the pay outright (unknown or closed
  account, reconciled days) is released; a SETTLED one never is. A Cancel
  settles the claim before it acts, so a release can never undo the home a
  tombstone was written to.

On PostgreSQL a pay's claim and its settle are each one statement in one round
trip (autocommit: psycopg sends no BEGIN and no COMMIT of its own; the
statement is prepared on its connection, SQLAlchemy compiles nothing): the
claim inserts and, when someone had the serial, returns theirs; the settle
commits without waiting for its WAL flush (synchronous_commit off for that
one statement), because a settle lost in a server crash leaves a CLAIMED
claim whose branch holds the serial, the state a crash after the branch
commit leaves and that the retry or the recovery pass settles. The claim
itself is durable before the branch commit.

Must never: let two branches hold the same (bank, serial), or release a
claim whose branch may hold the serial."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from mis_adapter.db.base import table_of
from mis_adapter.db.front import FrontCancel, FrontSerial
from yindian_common.errors import Unavailable

PAY, TOMBSTONE = "PAY", "TOMBSTONE"
CLAIMED, SETTLED = "CLAIMED", "SETTLED"
PRIMARY_HOME = ""                # tombstones of originals nobody claimed live in the primary database
CLAIM_ATTEMPTS_MAX = 3           # a claim that keeps meeting a row released meanwhile
LOOKUP_BATCH_MAX = 1_000         # serials per registry lookup statement

T_SER = table_of(FrontSerial)
T_CAN = table_of(FrontCancel)
_b = sa.bindparam
_INSERT = T_SER.insert()
_LOOKUP = sa.select(T_SER).where(T_SER.c.bank_id == _b("bank_id"), T_SER.c.serial == _b("serial"))
_LOOKUP_MANY = sa.select(T_SER).where(T_SER.c.bank_id == _b("bank_id"),
                                      T_SER.c.serial.in_(_b("serials", expanding=True)))
_SETTLE = (T_SER.update().where(T_SER.c.bank_id == _b("p_bank"), T_SER.c.serial == _b("p_serial"))
           .values(state=SETTLED, settled_at=_b("p_at")))
_SETTLE_MANY = (T_SER.update().where(T_SER.c.bank_id == _b("p_bank"),
                                     T_SER.c.serial.in_(_b("p_serials", expanding=True)),
                                     T_SER.c.state == CLAIMED)
                .values(state=SETTLED, settled_at=_b("p_at")))
_RELEASE = T_SER.delete().where(T_SER.c.bank_id == _b("p_bank"), T_SER.c.serial == _b("p_serial"),
                                T_SER.c.state == CLAIMED, T_SER.c.kind == PAY)
_OPEN = (sa.select(T_SER).where(T_SER.c.state == CLAIMED).order_by(T_SER.c.claimed_at).limit(_b("limit")))
_INSERT_CANCEL = T_CAN.insert()

# PostgreSQL, one statement each ($n placeholders, psycopg's RawCursor). CLAIM_PG: (True, ours) when
# inserted; (False, theirs) when the serial was claimed and committed before the statement started;
# no row when a claim committed while the insert waited on it (its row is not in this statement's
# snapshot) or it was released meanwhile: the caller reads it (`lookup`), as after an IntegrityError.
CLAIM_PG = """
WITH ins AS (
  INSERT INTO front_serials (bank_id, serial, kind, home, account_no, amount_fen, state, claimed_at, settled_at)
  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
  ON CONFLICT (bank_id, serial) DO NOTHING
  RETURNING kind, home, account_no, amount_fen, state)
SELECT true, kind, home, account_no, amount_fen, state FROM ins
UNION ALL
SELECT false, s.kind, s.home, s.account_no, s.amount_fen, s.state FROM front_serials s
WHERE s.bank_id = $1 AND s.serial = $2 AND NOT EXISTS (SELECT 1 FROM ins)"""
# SETTLE_PG: one row when the claim was there. SETTLE_PG_LAZY: the same without waiting for the WAL
# flush; its set_config lasts until this statement's own commit.
SETTLE_PG = """
UPDATE front_serials SET state = 'SETTLED', settled_at = $3 WHERE bank_id = $1 AND serial = $2 RETURNING 1"""
SETTLE_PG_LAZY = """
WITH relaxed AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS sync)
UPDATE front_serials SET state = 'SETTLED', settled_at = $3
WHERE bank_id = $1 AND serial = $2 AND (SELECT sync FROM relaxed) IS NOT NULL
RETURNING 1"""
_CANCEL = sa.select(T_CAN).where(T_CAN.c.bank_id == _b("bank_id"), T_CAN.c.cancel_serial == _b("serial"))
_CANCELS_MANY = sa.select(T_CAN).where(T_CAN.c.bank_id == _b("bank_id"),
                                      T_CAN.c.cancel_serial.in_(_b("serials", expanding=True)))
_RELEASE_CANCEL = T_CAN.delete().where(T_CAN.c.bank_id == _b("p_bank"), T_CAN.c.cancel_serial == _b("p_serial"))


@dataclass(frozen=True)
class Claim:
    bank_id: str
    serial: str
    kind: str          # PAY or TOMBSTONE
    home: str          # branch code of the database holding the serial ('' = primary)
    account_no: str
    amount_fen: int
    state: str         # CLAIMED or SETTLED


@dataclass(frozen=True)
class CancelClaim:
    bank_id: str
    cancel_serial: str
    original_serial: str
    amount_fen: int


def _claim_of(row: Any) -> Claim:
    return Claim(row.bank_id, row.serial, row.kind, row.home, row.account_no, row.amount_fen, row.state)


def lookup(front: Engine, bank_id: str, serial: str) -> Claim | None:
    with front.connect().execution_options(read_only=True) as conn, conn.begin():
        row = conn.execute(_LOOKUP, {"bank_id": bank_id, "serial": serial}).first()
    return None if row is None else _claim_of(row)


def lookup_many(front: Engine, bank_id: str, serials: Sequence[str]) -> dict[str, Claim]:
    """The claims of those serials that have one, in statements of LOOKUP_BATCH_MAX."""
    out: dict[str, Claim] = {}
    with front.connect().execution_options(read_only=True) as conn, conn.begin():
        for i in range(0, len(serials), LOOKUP_BATCH_MAX):
            chunk = list(serials[i:i + LOOKUP_BATCH_MAX])
            for row in conn.execute(_LOOKUP_MANY, {"bank_id": bank_id, "serials": chunk}):
                out[row.serial] = _claim_of(row)
    return out


def _pg_autocommit(front: Engine, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """`sql` alone in autocommit on a pooled front connection (PostgreSQL), prepared there;
    driver errors become SQLAlchemy's (db_errors translates them; a broken connection is invalidated).
    psycopg switches autocommit on an idle connection without a round trip, and the pool's rollback
    on return sends nothing when no transaction is open."""
    with front.connect() as conn:
        raw: Any = conn.connection.driver_connection
        raw.autocommit = True
        try:
            with psycopg.RawCursor(raw) as cur:
                cur.execute(sql, params, prepare=True)
                return cur.fetchall()
        except psycopg.Error as exc:
            if raw.closed or raw.broken:
                conn.invalidate()
            raise DBAPIError.instance(sql, list(params), exc, psycopg.Error,
                                      connection_invalidated=conn.invalidated) from exc
        finally:
            if not (raw.closed or raw.broken):
                raw.autocommit = False


def _claim_pg(front: Engine, want: Claim, now: dt.datetime) -> tuple[Claim, bool] | None:
    rows = _pg_autocommit(front, CLAIM_PG, (
        want.bank_id, want.serial, want.kind, want.home, want.account_no, want.amount_fen, want.state, now,
        now if want.state == SETTLED else None))
    if not rows:
        return None
    fresh, kind, home, account_no, amount_fen, state = rows[0]
    return (want, True) if fresh else (Claim(want.bank_id, want.serial, kind, home, account_no, amount_fen,
                                             state), False)


def claim(front: Engine, want: Claim, now: dt.datetime) -> tuple[Claim, bool]:
    """(want, True) when this call claimed the serial; (the existing claim, False)
    when someone had. One short transaction on the front database (PostgreSQL: one round trip)."""
    pg = front.dialect.name == "postgresql"
    for _attempt in range(CLAIM_ATTEMPTS_MAX):
        if pg:
            got = _claim_pg(front, want, now)
            if got is not None:
                return got
            existing = lookup(front, want.bank_id, want.serial)
            if existing is not None:
                return existing, False
            continue  # released between our insert and our read: claim again
        try:
            with front.begin() as conn:
                conn.execute(_INSERT, {"bank_id": want.bank_id, "serial": want.serial, "kind": want.kind,
                                       "home": want.home, "account_no": want.account_no,
                                       "amount_fen": want.amount_fen, "state": want.state, "claimed_at": now,
                                       "settled_at": now if want.state == SETTLED else None})
            return want, True
        except IntegrityError:
            existing = lookup(front, want.bank_id, want.serial)
            if existing is not None:
                return existing, False
            # released between our insert and our read: claim again
    raise Unavailable("the serial's claim kept racing a release; retry the same serial", reason="RETRY")


def _insert_ignoring(conn: Connection) -> Any:
    name = conn.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        return pg_insert(T_SER).on_conflict_do_nothing()
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        return sqlite_insert(T_SER).on_conflict_do_nothing()
    return T_SER.insert().prefix_with("IGNORE")


def claim_many(front: Engine, bank_id: str, wants: Sequence[Claim], now: dt.datetime) -> dict[str, Claim]:
    """Claims many serials of one bank in one front transaction (the bill feed's debits);
    returns each serial's claim after it: ours, or the one somebody made first."""
    out: dict[str, Claim] = {}
    for i in range(0, len(wants), LOOKUP_BATCH_MAX):
        chunk = wants[i:i + LOOKUP_BATCH_MAX]
        with front.begin() as conn:
            conn.execute(_insert_ignoring(conn), [
                {"bank_id": w.bank_id, "serial": w.serial, "kind": w.kind, "home": w.home,
                 "account_no": w.account_no, "amount_fen": w.amount_fen, "state": w.state, "claimed_at": now,
                 "settled_at": None} for w in chunk])
            for row in conn.execute(_LOOKUP_MANY, {"bank_id": bank_id, "serials": [w.serial for w in chunk]}):
                out[row.serial] = _claim_of(row)
    return out


def settled_many(front: Engine, bank_id: str, claims: Sequence[Claim], now: dt.datetime) -> dict[str, Claim]:
    """Writes SETTLED claims for serials already held by a branch (the backfill after a split),
    leaving any existing claim as it is; returns each serial's claim after it."""
    out: dict[str, Claim] = {}
    for i in range(0, len(claims), LOOKUP_BATCH_MAX):
        chunk = claims[i:i + LOOKUP_BATCH_MAX]
        with front.begin() as conn:
            conn.execute(_insert_ignoring(conn), [
                {"bank_id": c.bank_id, "serial": c.serial, "kind": c.kind, "home": c.home,
                 "account_no": c.account_no, "amount_fen": c.amount_fen, "state": SETTLED, "claimed_at": now,
                 "settled_at": now} for c in chunk])
            for row in conn.execute(_LOOKUP_MANY, {"bank_id": bank_id, "serials": [c.serial for c in chunk]}):
                out[row.serial] = _claim_of(row)
    return out


def cancels_many(front: Engine, bank_id: str, cancels: Sequence[CancelClaim],
                 now: dt.datetime) -> dict[str, CancelClaim]:
    """Writes cancel-serial claims (the backfill after a split), leaving existing ones; returns each after it."""
    out: dict[str, CancelClaim] = {}
    for i in range(0, len(cancels), LOOKUP_BATCH_MAX):
        chunk = cancels[i:i + LOOKUP_BATCH_MAX]
        with front.begin() as conn:
            name = conn.dialect.name
            if name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert
                stmt: Any = pg_insert(T_CAN).on_conflict_do_nothing()
            elif name == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert
                stmt = sqlite_insert(T_CAN).on_conflict_do_nothing()
            else:
                stmt = T_CAN.insert().prefix_with("IGNORE")
            conn.execute(stmt, [{"bank_id": c.bank_id, "cancel_serial": c.cancel_serial,
                                 "original_serial": c.original_serial, "amount_fen": c.amount_fen,
                                 "claimed_at": now} for c in chunk])
            for row in conn.execute(_CANCELS_MANY, {"bank_id": bank_id, "serials": [c.cancel_serial for c in chunk]}):
                out[row.cancel_serial] = CancelClaim(row.bank_id, row.cancel_serial, row.original_serial,
                                                     row.amount_fen)
    return out


def settle_many(front: Engine, bank_id: str, serials: Sequence[str], now: dt.datetime) -> None:
    for i in range(0, len(serials), LOOKUP_BATCH_MAX):
        with front.begin() as conn:
            conn.execute(_SETTLE_MANY, {"p_bank": bank_id, "p_serials": list(serials[i:i + LOOKUP_BATCH_MAX]),
                                        "p_at": now})


def settle(front: Engine, bank_id: str, serial: str, now: dt.datetime, *, durable: bool = True) -> bool:
    """Marks the claim SETTLED (never released); False when there is no claim. `durable=False`
    (PostgreSQL): a pay's settle after its branch commit, which the retry or recovery would redo."""
    if front.dialect.name == "postgresql":
        return len(_pg_autocommit(front, SETTLE_PG if durable else SETTLE_PG_LAZY, (bank_id, serial, now))) == 1
    with front.begin() as conn:
        return conn.execute(_SETTLE, {"p_bank": bank_id, "p_serial": serial, "p_at": now}).rowcount == 1


def release(front: Engine, bank_id: str, serial: str) -> None:
    """Drops a pay's claim that nothing settled: its branch refused the pay outright."""
    with front.begin() as conn:
        conn.execute(_RELEASE, {"p_bank": bank_id, "p_serial": serial})


def open_claims(front: Engine, limit: int) -> list[Claim]:
    return [c for c, _at in open_claims_with_age(front, limit)]


def open_claims_with_age(front: Engine, limit: int) -> list[tuple[Claim, dt.datetime]]:
    """Open (CLAIMED) claims, oldest first, each with when it was claimed."""
    with front.connect().execution_options(read_only=True) as conn, conn.begin():
        return [(_claim_of(r), r.claimed_at) for r in conn.execute(_OPEN, {"limit": limit})]


def claim_cancel(front: Engine, want: CancelClaim, now: dt.datetime) -> CancelClaim | None:
    """None when this call claimed the cancel serial, else the earlier claim of it."""
    try:
        with front.begin() as conn:
            conn.execute(_INSERT_CANCEL, {"bank_id": want.bank_id, "cancel_serial": want.cancel_serial,
                                          "original_serial": want.original_serial, "amount_fen": want.amount_fen,
                                          "claimed_at": now})
        return None
    except IntegrityError:
        with front.connect().execution_options(read_only=True) as conn, conn.begin():
            row = conn.execute(_CANCEL, {"bank_id": want.bank_id, "serial": want.cancel_serial}).first()
        if row is None:
            raise Unavailable("the cancel's claim raced a release; retry the same cancel_serial",
                              reason="RETRY") from None
        return CancelClaim(row.bank_id, row.cancel_serial, row.original_serial, row.amount_fen)


def release_cancel(front: Engine, bank_id: str, cancel_serial: str) -> None:
    with front.begin() as conn:
        conn.execute(_RELEASE_CANCEL, {"p_bank": bank_id, "p_serial": cancel_serial})
