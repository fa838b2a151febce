"""The bank core's own database: savings accounts (electricity-fee passbooks,
电费存折) loaded from the utility's agreement roster, outlets and tellers, and
a ledger of every bank-side transaction with its bank_serial, account, amount,
status and settlement date. SQLAlchemy Core, statements built once; SQLite by
default, PostgreSQL and MariaDB work the same.

A ledger row's life (the bank side of DESIGN.md semantics 1-3):

    PENDING --(utility posted)--> POSTED --(same-day cancel REVERSED)--> CANCELLED
       |
       +--(definite refusal)--> FAILED        (debit given back)

The savings debit and the PENDING row are one transaction; so are the credit
back and the move to FAILED or CANCELLED, and every move happens at most once
(each UPDATE names the state it leaves). A PENDING row is money the bank took
whose outcome it does not know yet: it stays PENDING until a retry of the same
serial gets a definite answer. Reconciliation reads POSTED and CANCELLED rows.

Functions here never commit: the caller owns the transaction."""
from __future__ import annotations

import csv
import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from yindian_common import fields
from yindian_common.errors import InvalidField

# Bounds.
ROSTER_ROWS_MAX = 5_000_000
LOAD_BATCH_ROWS = 5_000
REASON_MAX = 64
# Opening balances: most passbooks hold enough for a few bills; a share is too
# low for even one (the auto-debit work needs INSUFFICIENT_FUNDS cases).
LOW_BALANCE_MAX_FEN = 3_000
HEALTHY_BALANCE_MIN_FEN = 20_000
HEALTHY_BALANCE_MAX_FEN = 800_000

PENDING = "PENDING"
POSTED = "POSTED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
CANCEL_REQUESTED = "REQUESTED"
CANCEL_REFUSED = "REFUSED"
CANCEL_DONE = "DONE"

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)

metadata = sa.MetaData()

savings = sa.Table(
    "savings_accounts", metadata,
    sa.Column("bank_id", sa.String(16), primary_key=True),
    # The passbook is tied to the electricity account it pays for.
    sa.Column("account_no", sa.String(10), primary_key=True),
    sa.Column("opening_balance_fen", sa.BigInteger, nullable=False),
    sa.Column("balance_fen", sa.BigInteger, nullable=False),
    sa.Column("opened_at", _TS, nullable=False),
)

outlets = sa.Table(
    "outlets", metadata,
    sa.Column("bank_id", sa.String(16), primary_key=True),
    sa.Column("outlet_code", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
)

tellers = sa.Table(
    "tellers", metadata,
    sa.Column("bank_id", sa.String(16), primary_key=True),
    sa.Column("teller_id", sa.String(16), primary_key=True),
    sa.Column("outlet_code", sa.String(16), nullable=False),
)

ledger = sa.Table(
    "ledger", metadata,
    sa.Column("txn_id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("bank_id", sa.String(16), nullable=False),
    sa.Column("bank_serial", sa.String(32), nullable=False),
    sa.Column("account_no", sa.String(10), nullable=False),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    # the passbook's balance after the debit, sent with the Pay (a replay must send it again unchanged)
    sa.Column("balance_after_fen", sa.BigInteger, nullable=True),
    # COUNTER, AUTO_DEBIT, ATM, ONLINE
    sa.Column("channel", sa.String(12), nullable=False),
    sa.Column("outlet_code", sa.String(16), nullable=False, default=""),
    sa.Column("teller_id", sa.String(16), nullable=False, default=""),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("settlement_date", sa.Date, nullable=True),
    sa.Column("receipt_no", sa.String(24), nullable=False, default=""),
    sa.Column("payment_id", sa.String(32), nullable=False, default=""),
    sa.Column("cancel_serial", sa.String(32), nullable=True),
    sa.Column("cancel_date", sa.Date, nullable=True),
    # of a same-day cancel of a POSTED row: REQUESTED (sent, answer not yet definite), REFUSED, DONE
    sa.Column("cancel_state", sa.String(10), nullable=True),
    sa.Column("failure_reason", sa.String(REASON_MAX), nullable=False, default=""),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    sa.UniqueConstraint("bank_id", "bank_serial", name="uq_ledger_bank_serial"),
    sa.Index("ix_ledger_bank_status", "bank_id", "status"),
    sa.Index("ix_ledger_bank_day", "bank_id", "settlement_date"),
    sa.Index("ix_ledger_bank_cancel", "bank_id", "cancel_state"),
)


# Refunds the utility gave back (an auto-debit that met a bill already paid), credited to the passbook
# once per refund_id (bank_sim.link_ops); acknowledged to the utility after the credit committed.
refund_credits = sa.Table(
    "refund_credits", metadata,
    sa.Column("bank_id", sa.String(16), primary_key=True),
    sa.Column("refund_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("account_no", sa.String(10), nullable=False),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    sa.Column("original_serial", sa.String(32), nullable=False),
    sa.Column("credit_serial", sa.String(32), nullable=False),
    sa.Column("credited_at", _TS, nullable=False),
    sa.Column("acknowledged_at", _TS, nullable=True),
)


class LedgerError(Exception):
    """An expected refusal by the bank core itself (not a wire status)."""


class PassbookNotFound(LedgerError):
    pass


class InsufficientFunds(LedgerError):
    pass


class SerialUsed(LedgerError):
    pass


@dataclass(frozen=True)
class Passbook:
    account_no: str
    balance_fen: int


@dataclass(frozen=True)
class LedgerRow:
    bank_serial: str
    account_no: str
    amount_fen: int
    channel: str
    outlet_code: str
    teller_id: str
    status: str
    settlement_date: dt.date | None
    cancel_serial: str | None
    balance_after_fen: int | None


@dataclass(frozen=True)
class StatusTotal:
    status: str
    count: int
    amount_fen: int


def create_schema(engine: Engine) -> None:
    metadata.create_all(engine, checkfirst=True)


# ---- statements, built once ----

_ROW_COLS = (ledger.c.bank_serial, ledger.c.account_no, ledger.c.amount_fen, ledger.c.channel, ledger.c.outlet_code,
             ledger.c.teller_id, ledger.c.status, ledger.c.settlement_date, ledger.c.cancel_serial,
             ledger.c.balance_after_fen)

_debit = (savings.update()
          .where(savings.c.bank_id == sa.bindparam("p_bank"), savings.c.account_no == sa.bindparam("p_account"),
                 savings.c.balance_fen >= sa.bindparam("p_amount"))
          .values(balance_fen=savings.c.balance_fen - sa.bindparam("p_amount")))
_credit = (savings.update()
           .where(savings.c.bank_id == sa.bindparam("p_bank"), savings.c.account_no == sa.bindparam("p_account"))
           .values(balance_fen=savings.c.balance_fen + sa.bindparam("p_amount")))
_balance = sa.select(savings.c.balance_fen).where(savings.c.bank_id == sa.bindparam("p_bank"),
                                                  savings.c.account_no == sa.bindparam("p_account"))
_serial_taken = sa.select(ledger.c.txn_id).where(ledger.c.bank_id == sa.bindparam("p_bank"),
                                                 ledger.c.bank_serial == sa.bindparam("p_serial"))
_insert_row = ledger.insert()
_row_by_serial = sa.select(*_ROW_COLS).where(
    ledger.c.bank_id == sa.bindparam("p_bank"), ledger.c.bank_serial == sa.bindparam("p_serial"))
_to_posted = (ledger.update()
              .where(ledger.c.bank_id == sa.bindparam("p_bank"), ledger.c.bank_serial == sa.bindparam("p_serial"),
                     ledger.c.status == PENDING)
              .values(status=POSTED, settlement_date=sa.bindparam("p_day"), receipt_no=sa.bindparam("p_receipt"),
                      payment_id=sa.bindparam("p_payment"), updated_at=sa.bindparam("p_now")))
_to_failed = (ledger.update()
              .where(ledger.c.bank_id == sa.bindparam("p_bank"), ledger.c.bank_serial == sa.bindparam("p_serial"),
                     ledger.c.status == PENDING)
              .values(status=FAILED, failure_reason=sa.bindparam("p_reason"), updated_at=sa.bindparam("p_now")))
_cancel_requested = (ledger.update()
                     .where(ledger.c.bank_id == sa.bindparam("p_bank"),
                            ledger.c.bank_serial == sa.bindparam("p_serial"),
                            ledger.c.status == POSTED, ledger.c.cancel_serial.is_(None))
                     .values(cancel_serial=sa.bindparam("p_cancel"), cancel_state=CANCEL_REQUESTED,
                             updated_at=sa.bindparam("p_now")))
_cancel_refused = (ledger.update()
                   .where(ledger.c.bank_id == sa.bindparam("p_bank"), ledger.c.bank_serial == sa.bindparam("p_serial"),
                          ledger.c.status == POSTED, ledger.c.cancel_state == CANCEL_REQUESTED)
                   .values(cancel_state=CANCEL_REFUSED, failure_reason=sa.bindparam("p_reason"),
                           updated_at=sa.bindparam("p_now")))
_to_cancelled = (ledger.update()
                 .where(ledger.c.bank_id == sa.bindparam("p_bank"), ledger.c.bank_serial == sa.bindparam("p_serial"),
                        ledger.c.status == POSTED)
                 .values(status=CANCELLED, cancel_date=sa.bindparam("p_day"), cancel_state=CANCEL_DONE,
                         updated_at=sa.bindparam("p_now")))
_totals = (sa.select(ledger.c.status, sa.func.count(), sa.func.coalesce(sa.func.sum(ledger.c.amount_fen), 0))
           .where(ledger.c.bank_id == sa.bindparam("p_bank"), ledger.c.bank_serial.startswith(sa.bindparam("p_prefix")))
           .group_by(ledger.c.status))
_pending = (sa.select(*_ROW_COLS)
            .where(ledger.c.bank_id == sa.bindparam("p_bank"), ledger.c.status == PENDING)
            .order_by(ledger.c.txn_id).limit(sa.bindparam("p_limit")))
_pending_cancels = (sa.select(*_ROW_COLS)
                    .where(ledger.c.bank_id == sa.bindparam("p_bank"), ledger.c.status == POSTED,
                           ledger.c.cancel_state == CANCEL_REQUESTED)
                    .order_by(ledger.c.txn_id).limit(sa.bindparam("p_limit")))
_day_records = (sa.select(*_ROW_COLS)
                .where(ledger.c.bank_id == sa.bindparam("p_bank"),
                       ledger.c.settlement_date == sa.bindparam("p_day"),
                       ledger.c.status.in_([POSTED, CANCELLED]))
                .order_by(ledger.c.txn_id))


# ---- roster, outlets, tellers ----

def read_roster(path: str | Path) -> list[str]:
    """Account numbers of a roster CSV (header line, an `account_no` column),
    each checked by the field rules; duplicates dropped, order kept."""
    seen: dict[str, None] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "account_no" not in reader.fieldnames:
            raise ValueError(f"{path}: roster needs a header line with an account_no column")
        for n, row in enumerate(reader, start=2):
            if len(seen) >= ROSTER_ROWS_MAX:
                raise ValueError(f"{path}: more than {ROSTER_ROWS_MAX} rows")
            value = (row.get("account_no") or "").strip()
            try:
                seen[fields.account_no(value)] = None
            except InvalidField as exc:
                raise ValueError(f"{path} line {n}: {exc.message}") from exc
    return list(seen)


def opening_balance_fen(rng: random.Random, low_balance_ratio: float) -> int:
    """A realistic opening balance: mostly 200-8,000 yuan (log-uniform), a share below 30 yuan."""
    if rng.random() < low_balance_ratio:
        return rng.randint(0, LOW_BALANCE_MAX_FEN)
    lo, hi = HEALTHY_BALANCE_MIN_FEN, HEALTHY_BALANCE_MAX_FEN
    return int(lo * (hi / lo) ** rng.random())


def load_passbooks(conn: sa.Connection, bank_id: str, account_nos: list[str], *, rng: random.Random,
                   low_balance_ratio: float, now: dt.datetime) -> int:
    """Opens a passbook for every roster account that has none; returns how many were opened.
    Existing passbooks keep their balance, so loading a roster again is harmless."""
    existing = set(conn.execute(sa.select(savings.c.account_no).where(savings.c.bank_id == bank_id)).scalars())
    opened = 0
    batch: list[dict[str, object]] = []
    for account in account_nos:
        if account in existing:
            continue
        balance = opening_balance_fen(rng, low_balance_ratio)
        batch.append({"bank_id": bank_id, "account_no": account, "opening_balance_fen": balance,
                      "balance_fen": balance, "opened_at": now})
        if len(batch) >= LOAD_BATCH_ROWS:
            conn.execute(savings.insert(), batch)
            opened += len(batch)
            batch = []
    if batch:
        conn.execute(savings.insert(), batch)
        opened += len(batch)
    return opened


def outlet_code(index: int) -> str:
    return f"OUT{index:03d}"


def teller_id(outlet_index: int, teller_index: int) -> str:
    return f"TLR{outlet_index:03d}{teller_index:02d}"


def ensure_outlets(conn: sa.Connection, bank_id: str, outlet_count: int, tellers_per_outlet: int) -> list[tuple[str, str]]:
    """Creates the missing outlets and tellers; returns every (outlet_code, teller_id) pair, in order."""
    have_outlets = set(conn.execute(sa.select(outlets.c.outlet_code).where(outlets.c.bank_id == bank_id)).scalars())
    have_tellers = set(conn.execute(sa.select(tellers.c.teller_id).where(tellers.c.bank_id == bank_id)).scalars())
    pairs: list[tuple[str, str]] = []
    for i in range(1, outlet_count + 1):
        code = outlet_code(i)
        if code not in have_outlets:
            conn.execute(outlets.insert(), {"bank_id": bank_id, "outlet_code": code, "name": f"Outlet {i}"})
        for j in range(1, tellers_per_outlet + 1):
            tid = teller_id(i, j)
            if tid not in have_tellers:
                conn.execute(tellers.insert(), {"bank_id": bank_id, "teller_id": tid, "outlet_code": code})
            pairs.append((code, tid))
    return pairs


# ---- money ----

def balance_fen(conn: sa.Connection, bank_id: str, account_no: str) -> int:
    value = conn.execute(_balance, {"p_bank": bank_id, "p_account": account_no}).scalar()
    if value is None:
        raise PassbookNotFound(f"no passbook for account {account_no}")
    return int(value)


def debit_for_pay(conn: sa.Connection, *, bank_id: str, bank_serial: str, account_no: str, amount_fen: int,
                  channel: str, outlet_code: str, teller_id: str, now: dt.datetime) -> int:
    """Takes `amount_fen` from the passbook and records a PENDING ledger row,
    in the caller's transaction. Returns the balance after the debit."""
    if amount_fen <= 0:
        raise ValueError(f"debit of {amount_fen} fen")
    if conn.execute(_serial_taken, {"p_bank": bank_id, "p_serial": bank_serial}).first() is not None:
        raise SerialUsed(f"bank serial {bank_serial} already in the ledger")
    params = {"p_bank": bank_id, "p_account": account_no, "p_amount": amount_fen}
    if conn.execute(_debit, params).rowcount != 1:
        balance = balance_fen(conn, bank_id, account_no)  # raises PassbookNotFound
        raise InsufficientFunds(f"balance {balance} fen < {amount_fen} fen")
    after = balance_fen(conn, bank_id, account_no)
    if after < 0:
        raise RuntimeError(f"passbook {account_no} went negative: {after} fen")
    conn.execute(_insert_row, {
        "bank_id": bank_id, "bank_serial": bank_serial, "account_no": account_no, "amount_fen": amount_fen,
        "balance_after_fen": after, "channel": channel, "outlet_code": outlet_code, "teller_id": teller_id,
        "status": PENDING, "receipt_no": "", "payment_id": "", "failure_reason": "", "created_at": now,
        "updated_at": now})
    return after


def mark_posted(conn: sa.Connection, *, bank_id: str, bank_serial: str, settlement_date: dt.date,
                receipt_no: str, payment_id: str, now: dt.datetime) -> bool:
    """PENDING -> POSTED; False if the row had already left PENDING."""
    return bool(conn.execute(_to_posted, {
        "p_bank": bank_id, "p_serial": bank_serial, "p_day": settlement_date, "p_receipt": receipt_no[:24],
        "p_payment": payment_id[:32], "p_now": now}).rowcount == 1)


def mark_failed(conn: sa.Connection, *, bank_id: str, bank_serial: str, reason: str, now: dt.datetime) -> bool:
    """PENDING -> FAILED and the debit given back; False if the row had already left PENDING."""
    row = _one(conn, bank_id, bank_serial)
    moved = conn.execute(_to_failed, {"p_bank": bank_id, "p_serial": bank_serial, "p_reason": reason[:REASON_MAX],
                                      "p_now": now}).rowcount == 1
    if moved:
        conn.execute(_credit, {"p_bank": bank_id, "p_account": row.account_no, "p_amount": row.amount_fen})
    return bool(moved)


def request_cancel(conn: sa.Connection, *, bank_id: str, bank_serial: str, cancel_serial: str,
                   now: dt.datetime) -> bool:
    """Records the cancel serial on a POSTED row before the Cancel is sent, so
    a retry after a crash reuses it. False if the row is not POSTED or already has one."""
    return bool(conn.execute(_cancel_requested, {"p_bank": bank_id, "p_serial": bank_serial,
                                                 "p_cancel": cancel_serial, "p_now": now}).rowcount == 1)


def mark_cancel_refused(conn: sa.Connection, *, bank_id: str, bank_serial: str, reason: str,
                        now: dt.datetime) -> bool:
    """A definite refusal of the cancel: the row stays POSTED (the money stays with the utility)."""
    return bool(conn.execute(_cancel_refused, {"p_bank": bank_id, "p_serial": bank_serial,
                                               "p_reason": reason[:REASON_MAX], "p_now": now}).rowcount == 1)


def mark_cancelled(conn: sa.Connection, *, bank_id: str, bank_serial: str, cancel_date: dt.date,
                   now: dt.datetime) -> bool:
    """POSTED -> CANCELLED and the money given back to the passbook; False if not POSTED."""
    row = _one(conn, bank_id, bank_serial)
    moved = conn.execute(_to_cancelled, {"p_bank": bank_id, "p_serial": bank_serial, "p_day": cancel_date,
                                         "p_now": now}).rowcount == 1
    if moved:
        conn.execute(_credit, {"p_bank": bank_id, "p_account": row.account_no, "p_amount": row.amount_fen})
    return bool(moved)


def _ledger_row(r: Any) -> LedgerRow:
    return LedgerRow(**r._mapping)


def row(conn: sa.Connection, bank_id: str, bank_serial: str) -> LedgerRow | None:
    r = conn.execute(_row_by_serial, {"p_bank": bank_id, "p_serial": bank_serial}).first()
    return _ledger_row(r) if r is not None else None


def _one(conn: sa.Connection, bank_id: str, bank_serial: str) -> LedgerRow:
    r = row(conn, bank_id, bank_serial)
    if r is None:
        raise KeyError(f"bank serial {bank_serial} not in the ledger")
    return r


def pending_rows(conn: sa.Connection, bank_id: str, limit: int) -> list[LedgerRow]:
    """PENDING rows (money taken, outcome unknown), oldest first, at most `limit`."""
    return [_ledger_row(r) for r in conn.execute(_pending, {"p_bank": bank_id, "p_limit": limit})]


def pending_cancels(conn: sa.Connection, bank_id: str, limit: int) -> list[LedgerRow]:
    """POSTED rows whose cancel was sent without a definite answer yet, oldest first, at most `limit`."""
    return [_ledger_row(r) for r in conn.execute(_pending_cancels, {"p_bank": bank_id, "p_limit": limit})]


def day_records(conn: sa.Connection, bank_id: str, settlement_date: dt.date) -> Iterator[LedgerRow]:
    """The bank's records of a settlement date for reconciliation: POSTED and CANCELLED rows."""
    for r in conn.execute(_day_records, {"p_bank": bank_id, "p_day": settlement_date}):
        yield _ledger_row(r)


def totals_by_status(conn: sa.Connection, bank_id: str, serial_prefix: str = "") -> dict[str, StatusTotal]:
    """Count and fen per status, of the rows whose serial starts with `serial_prefix` (one run's)."""
    params = {"p_bank": bank_id, "p_prefix": serial_prefix}
    return {s: StatusTotal(s, int(n), int(f)) for s, n, f in conn.execute(_totals, params)}


def check_passbooks(conn: sa.Connection, bank_id: str) -> int:
    """Invariant: every passbook's balance = opening balance - its PENDING and
    POSTED debits + the refunds credited to it. Returns the number of passbooks
    that break it (0 when sound)."""
    held = (sa.select(ledger.c.account_no, sa.func.sum(ledger.c.amount_fen).label("held_fen"))
            .where(ledger.c.bank_id == bank_id, ledger.c.status.in_([PENDING, POSTED]))
            .group_by(ledger.c.account_no).subquery())
    back = (sa.select(refund_credits.c.account_no, sa.func.sum(refund_credits.c.amount_fen).label("back_fen"))
            .where(refund_credits.c.bank_id == bank_id).group_by(refund_credits.c.account_no).subquery())
    broken = (sa.select(sa.func.count())
              .select_from(savings.outerjoin(held, held.c.account_no == savings.c.account_no)
                           .outerjoin(back, back.c.account_no == savings.c.account_no))
              .where(savings.c.bank_id == bank_id,
                     savings.c.balance_fen != savings.c.opening_balance_fen - sa.func.coalesce(held.c.held_fen, 0)
                     + sa.func.coalesce(back.c.back_fen, 0)))
    return int(conn.execute(broken).scalar_one())
