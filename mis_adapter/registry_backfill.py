"""Backfilling the front registry when one database is split into branch
databases (README, "Branch servers and replicas"): every serial the MIS
databases already hold (payments, reversals, tombstones, and cancel
serials) is written into the registry as SETTLED, with the database that
holds it as its home, so that a serial used before the split is one payment
across branches after it too.

Run once after moving the branches' rows and before `serve --branch-db`
takes traffic (it is idempotent: a rerun writes nothing new). A serial two
databases hold (the same bank serial posted in both before the registry
existed) cannot be one payment: it is reported, with both homes, and the
command exits 1 after loading everything else; the operator settles it with
the bank. Memory: one batch of BACKFILL_BATCH_ROWS rows at a time, and at
most CONFLICTS_SHOWN_MAX conflicts kept for the report. Never changes a
branch database."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter import registry
from mis_adapter.db.base import table_of
from mis_adapter.db.core import CancelRow, Payment
from mis_adapter.registry import CancelClaim, Claim
from mis_adapter.routing import BranchRouter

BACKFILL_BATCH_ROWS = 1_000     # rows read from a branch database (and written to the front) per step
CONFLICTS_SHOWN_MAX = 100       # conflicting serials kept for the report

T_PAY = table_of(Payment)
T_CAN = table_of(CancelRow)
_b = sa.bindparam
_PAYS = (sa.select(T_PAY.c.payment_id, T_PAY.c.bank_id, T_PAY.c.bank_serial, T_PAY.c.state, T_PAY.c.account_no,
                   T_PAY.c.amount_fen)
         .where(T_PAY.c.payment_id > _b("after")).order_by(T_PAY.c.payment_id).limit(BACKFILL_BATCH_ROWS))
_CANCELS = (sa.select(T_CAN.c.cancel_id, T_CAN.c.bank_id, T_CAN.c.cancel_serial, T_CAN.c.original_serial,
                      T_CAN.c.amount_fen)
            .where(T_CAN.c.cancel_id > _b("after")).order_by(T_CAN.c.cancel_id).limit(BACKFILL_BATCH_ROWS))


@dataclass
class BackfillReport:
    serials: int = 0          # payment and tombstone serials looked at
    cancels: int = 0          # cancel serials looked at
    conflicts: int = 0        # serials another database (or an earlier claim elsewhere) already holds
    shown: list[str] = field(default_factory=list)

    def conflict(self, text: str) -> None:
        self.conflicts += 1
        if len(self.shown) < CONFLICTS_SHOWN_MAX:
            self.shown.append(text)


def _batches(engine: Engine, query: sa.Select, key: str) -> Iterator[list[sa.Row]]:  # type: ignore[type-arg]
    after = 0
    while True:
        with engine.connect().execution_options(read_only=True) as conn, conn.begin():
            rows = conn.execute(query, {"after": after}).all()
        if not rows:
            return
        yield list(rows)
        after = int(getattr(rows[-1], key))


def _home(router: BranchRouter, key: str, engine: Engine, account_no: str) -> str:
    """Where the serial lives: its account's branch code when routing agrees, else the database's key."""
    if account_no and router.engine_for(account_no) is engine:
        return account_no[:2]
    return key


def backfill(router: BranchRouter, now: dt.datetime) -> BackfillReport:
    front = router.front
    if front is None:
        raise RuntimeError("backfill needs branch databases (--branch-db) or a front database")
    report = BackfillReport()
    for key, engine in router.database_keys():
        for rows in _batches(engine, _PAYS, "payment_id"):
            by_bank: dict[str, list[Claim]] = {}
            for r in rows:
                kind = registry.TOMBSTONE if r.state == "TOMBSTONE" else registry.PAY
                by_bank.setdefault(r.bank_id, []).append(Claim(
                    r.bank_id, r.bank_serial, kind, _home(router, key, engine, r.account_no or ""),
                    r.account_no or "", int(r.amount_fen), registry.SETTLED))
            for bank_id, wants in by_bank.items():
                held = registry.settled_many(front, bank_id, wants, now)
                for w in wants:
                    report.serials += 1
                    h = held[w.serial]
                    if router.engine_for_branch(h.home) is not engine or h.kind != w.kind:
                        report.conflict(f"bank {bank_id} serial {w.serial}: {w.kind} in database "
                                        f"{key or 'primary'}, the registry says {h.kind} in "
                                        f"{h.home or 'primary'}")
        for rows in _batches(engine, _CANCELS, "cancel_id"):
            by_bank_c: dict[str, list[CancelClaim]] = {}
            for r in rows:
                by_bank_c.setdefault(r.bank_id, []).append(
                    CancelClaim(r.bank_id, r.cancel_serial, r.original_serial, int(r.amount_fen)))
            for bank_id, cans in by_bank_c.items():
                held_c = registry.cancels_many(front, bank_id, cans, now)
                for c in cans:
                    report.cancels += 1
                    if held_c[c.cancel_serial] != c:
                        report.conflict(f"bank {bank_id} cancel serial {c.cancel_serial}: cancels "
                                        f"{c.original_serial} in database {key or 'primary'}, the registry says "
                                        f"it cancels {held_c[c.cancel_serial].original_serial}")
    return report
