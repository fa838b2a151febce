"""Auto-debit agreements (代扣协议, 签约/解约) signed and ended by a bank over
the link, and listed for the bank that signed them.

Rules (DESIGN.md status codes; README "Agreements"):
- Sign is idempotent per (bank, agreement_serial): the same request again
  answers the stored agreement (`replayed`), different parameters give
  ALREADY_EXISTS (SerialConflict). End is idempotent per (bank, end_serial).
- An account has at most one ACTIVE agreement. Signing an account that has
  one (at this bank or another; which is never said) is FAILED_PRECONDITION
  AGREEMENT_ACTIVE. An unknown account is NOT_FOUND, a closed one
  FAILED_PRECONDITION ACCOUNT_CLOSED.
- Only the signing bank sees or ends an agreement: ending an account with no
  active agreement of the caller's (none, or another bank's) is NOT_FOUND
  AGREEMENT_NOT_FOUND, identical either way.
- Bills issued on or after `start_date` (and not above `debit_limit_fen`)
  are fed while the agreement is active; ending it stops the feed for later
  bills, and the account's notices still without a result are withdrawn
  (`feed_withdrawals`: redelivered marked withdrawn, answered NOT_DEBITED).
- `agreement_records` is the history; the `agreements` row of the account is
  the index bill issuance reads. Both, and the journal line, are written
  only by `sign_many_in_tx` / `end_in_tx` (the seed signs through the same
  `sign_many_in_tx`).

The first half is pure (commands, validation, the replay rule); the second
is storage over SQLAlchemy Core. The caller owns transactions given a
Connection; functions given an Engine run their own. Must never: write
anything for a refused request, or let one account have two active rows."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from mis_adapter.db.base import table_of
from mis_adapter.db.core import Agreement, BillRow, Customer, JournalEntry
from mis_adapter.db.feed import DebitResultRow, OutboxRow
from mis_adapter.db.link import AgreementRecord, FeedWithdrawal
from yindian_common import fields
from yindian_common.bulk_sql import bulk_insert
from yindian_common.errors import (
    AccountClosed,
    AccountNotFound,
    AgreementActive,
    AgreementNotFound,
    InvalidField,
    SerialConflict,
)

__all__ = [
    "ACTIVE", "ENDED", "PAGE_SIZE_MAX", "PAGE_SIZE_DEFAULT", "START_AHEAD_MAX_DAYS", "SIGN_BATCH_MAX",
    "SignCommand", "EndCommand", "AgreementView", "SignResult", "EndResult", "AgreementPage",
    "AgreementNotFound", "AgreementActive", "validate_sign", "validate_end", "same_sign",
    "sign", "sign_many_in_tx", "end", "end_in_tx", "list_agreements", "page_size_of", "withdrawn_among",
    "NOT_DEBITED", "WITHDRAWN",
]

ACTIVE, ENDED = "ACTIVE", "ENDED"
# The bank's answer to a withdrawn notice (DEBIT_OUTCOME_NOT_DEBITED), and the feed result's disposition.
NOT_DEBITED, WITHDRAWN = "NOT_DEBITED", "WITHDRAWN"
PAGE_SIZE_MAX = 500            # agreements per ListAgreements page
PAGE_SIZE_DEFAULT = 100
START_AHEAD_MAX_DAYS = 366     # how far ahead a start date may be
SIGN_BATCH_MAX = 1_000         # agreements signed per statement batch (seed)
SAVINGS_REF_MAX = 32


# ---- pure: commands, validation, replay ----

@dataclass(frozen=True)
class SignCommand:
    bank_id: str
    agreement_serial: str
    account_no: str
    savings_account_ref: str
    debit_limit_fen: int | None = None
    # None: today
    start_date: dt.date | None = None


@dataclass(frozen=True)
class EndCommand:
    bank_id: str
    end_serial: str
    account_no: str
    reason: str = ""


@dataclass(frozen=True)
class AgreementView:
    agreement_id: int
    bank_id: str
    agreement_serial: str
    account_no: str
    savings_account_ref: str
    debit_limit_fen: int | None
    start_date: dt.date
    state: str
    signed_at: dt.datetime
    end_serial: str
    end_date: dt.date | None
    ended_at: dt.datetime | None


@dataclass(frozen=True)
class SignResult:
    agreement: AgreementView
    replayed: bool


@dataclass(frozen=True)
class EndResult:
    agreement: AgreementView
    replayed: bool
    withdrawn_notices: int


@dataclass(frozen=True)
class AgreementPage:
    agreements: list[AgreementView]
    next_page_token: str


def validate_sign(cmd: SignCommand, today: dt.date) -> SignCommand:
    """The command with its start date resolved, or InvalidField naming the field."""
    fields.serial(cmd.agreement_serial, "agreement_serial")
    fields.account_no(cmd.account_no)
    fields.serial(cmd.savings_account_ref, "savings_account_ref")
    if cmd.debit_limit_fen is not None:
        fields.amount_fen(cmd.debit_limit_fen, "debit_limit_fen")
    start = cmd.start_date or today
    if start < today:
        raise InvalidField("start_date", f"must not be before today ({today.isoformat()})")
    if start > today + dt.timedelta(days=START_AHEAD_MAX_DAYS):
        raise InvalidField("start_date", f"must be at most {START_AHEAD_MAX_DAYS} days ahead")
    return SignCommand(cmd.bank_id, cmd.agreement_serial, cmd.account_no, cmd.savings_account_ref,
                       cmd.debit_limit_fen, start)


def validate_end(cmd: EndCommand) -> EndCommand:
    fields.serial(cmd.end_serial, "end_serial")
    fields.account_no(cmd.account_no)
    fields.text(cmd.reason, "reason", fields.REASON_MAX)
    return cmd


def same_sign(stored: AgreementView, cmd: SignCommand) -> bool:
    """A replay carries the stored parameters (an omitted start date matches the stored one)."""
    return (stored.account_no == cmd.account_no and stored.savings_account_ref == cmd.savings_account_ref
            and stored.debit_limit_fen == cmd.debit_limit_fen
            and (cmd.start_date is None or cmd.start_date == stored.start_date))


def page_size_of(requested: int) -> int:
    if requested == 0:
        return PAGE_SIZE_DEFAULT
    if not 1 <= requested <= PAGE_SIZE_MAX:
        raise InvalidField("page_size", f"must be between 1 and {PAGE_SIZE_MAX} (0: {PAGE_SIZE_DEFAULT})")
    return requested


def _page_token(engine_index: int, last_id: int) -> str:
    return f"{engine_index}.{last_id}"


def _parse_token(token: str, engines: int) -> tuple[int, int]:
    if not token:
        return 0, 0
    head, sep, tail = token.partition(".")
    if not sep or not head.isdigit() or not tail.isdigit() or len(token) > 40 or int(head) >= engines:
        raise InvalidField("page_token", "is not a token this service returned")
    return int(head), int(tail)


# ---- storage ----

T_REC = table_of(AgreementRecord)
T_AGR = table_of(Agreement)
T_CUST = table_of(Customer)
T_JOURNAL = table_of(JournalEntry)
T_OUT = table_of(OutboxRow)
T_RES = table_of(DebitResultRow)
T_BILLS = table_of(BillRow)
T_WD = table_of(FeedWithdrawal)
_b = sa.bindparam

_BY_SIGN_SERIAL = sa.select(T_REC).where(T_REC.c.bank_id == _b("bank_id"), T_REC.c.agreement_serial == _b("serial"))
_BY_SIGN_SERIAL_LOCKED = _BY_SIGN_SERIAL.with_for_update()
_BY_END_SERIAL = sa.select(T_REC).where(T_REC.c.bank_id == _b("bank_id"), T_REC.c.end_serial == _b("serial"))
_LOCK_CUSTOMERS = (sa.select(T_CUST.c.account_no, T_CUST.c.status)
                   .where(T_CUST.c.account_no.in_(_b("accts", expanding=True)))
                   .order_by(T_CUST.c.account_no).with_for_update())
_INDEX_ROWS = sa.select(T_AGR.c.account_no, T_AGR.c.active).where(T_AGR.c.account_no.in_(_b("accts", expanding=True)))
_IDS_BY_SERIAL = sa.select(T_REC.c.agreement_id, T_REC.c.agreement_serial).where(
    T_REC.c.bank_id == _b("bank_id"), T_REC.c.agreement_serial.in_(_b("serials", expanding=True)))
_BY_END_SERIAL_LOCKED = _BY_END_SERIAL.with_for_update()
_ACTIVE_OF_BANK = sa.select(T_REC).where(T_REC.c.account_no == _b("account_no"), T_REC.c.bank_id == _b("bank_id"),
                                         T_REC.c.state == ACTIVE)
_END_RECORD = (T_REC.update().where(T_REC.c.agreement_id == _b("a_id"), T_REC.c.state == ACTIVE)
               .values(state=ENDED, end_serial=_b("e_serial"), end_reason=_b("e_reason"), end_date=_b("e_date"),
                       ended_at=_b("e_at")))
_DEACTIVATE_INDEX = (T_AGR.update().where(T_AGR.c.account_no == _b("acct"), T_AGR.c.agreement_id == _b("a_id"))
                     .values(active=False))
_UPDATE_INDEX = (T_AGR.update().where(T_AGR.c.account_no == _b("acct"))
                 .values(bank_id=_b("v_bank"), signed_on=_b("v_start"), active=True, agreement_id=_b("v_id"),
                         debit_limit_fen=_b("v_limit")))
# The account's notices of this bank with no result yet (through its bills: both lookups are indexed).
_UNANSWERED = (sa.select(T_OUT.c.seq)
               .select_from(T_OUT.join(T_BILLS, T_BILLS.c.bill_id == T_OUT.c.bill_id))
               .where(T_BILLS.c.account_no == _b("account_no"), T_OUT.c.bank_id == _b("bank_id"),
                      ~sa.exists().where(T_RES.c.bank_id == T_OUT.c.bank_id, T_RES.c.seq == T_OUT.c.seq),
                      ~sa.exists().where(T_WD.c.bank_id == T_OUT.c.bank_id, T_WD.c.seq == T_OUT.c.seq))
               .order_by(T_OUT.c.seq))
_WITHDRAWN_OF = sa.select(sa.func.count()).select_from(T_WD).where(T_WD.c.agreement_id == _b("a_id"))
_WITHDRAWN_AMONG = sa.select(T_WD.c.seq).where(T_WD.c.bank_id == _b("bank_id"),
                                              T_WD.c.seq.between(_b("lo"), _b("hi")))


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    # SQLite returns naive instants (stored in UTC)
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=dt.UTC))


def view_of(row: Any) -> AgreementView:
    signed_at = _aware(row.signed_at)
    assert signed_at is not None
    return AgreementView(int(row.agreement_id), row.bank_id, row.agreement_serial, row.account_no,
                         row.savings_account_ref, None if row.debit_limit_fen is None else int(row.debit_limit_fen),
                         row.start_date, row.state, signed_at, row.end_serial or "", row.end_date,
                         _aware(row.ended_at))


def _journal(rpc: str, bank_id: str, serial: str, account_no: str, outcome: str, now: dt.datetime) -> dict[str, Any]:
    return {"at": now, "bank_id": bank_id, "rpc": rpc, "serial": serial, "original_serial": "",
            "account_no": account_no, "amount_fen": 0, "outcome": outcome, "payment_id": None}


def sign_many_in_tx(conn: Connection, cmds: Sequence[SignCommand], today: dt.date, now: dt.datetime) -> list[int]:
    """Signs new agreements (validated commands, serials not yet used, at most
    one per account) in the caller's transaction: locks the accounts, refuses
    an unknown, closed or already covered account before writing anything,
    then writes the records, the accounts' index rows and journal lines.
    Returns the new agreement ids in command order."""
    if not cmds:
        return []
    accts = [c.account_no for c in cmds]
    if len(set(accts)) != len(accts):
        raise ValueError("sign_many_in_tx: one command per account")
    if conn.dialect.name == "postgresql":
        return _sign_many_pg(conn, cmds, now)
    ids: dict[tuple[str, str], int] = {}
    for start in range(0, len(cmds), SIGN_BATCH_MAX):
        batch = cmds[start:start + SIGN_BATCH_MAX]
        batch_accts = sorted(c.account_no for c in batch)
        status = {r.account_no: r.status for r in conn.execute(_LOCK_CUSTOMERS, {"accts": batch_accts})}
        index = {r.account_no: bool(r.active) for r in conn.execute(_INDEX_ROWS, {"accts": batch_accts})}
        for c in batch:
            if c.account_no not in status:
                raise AccountNotFound(f"account {c.account_no} not found")
            if status[c.account_no] != "OPEN":
                raise AccountClosed(f"account {c.account_no} is closed")
            if index.get(c.account_no):
                raise AgreementActive(f"account {c.account_no} already has an active auto-debit agreement")
            if c.start_date is None:
                raise ValueError("sign_many_in_tx needs validated commands (start_date resolved)")
        bulk_insert(conn, T_REC, [
            {"bank_id": c.bank_id, "agreement_serial": c.agreement_serial, "account_no": c.account_no,
             "savings_account_ref": c.savings_account_ref, "debit_limit_fen": c.debit_limit_fen,
             "start_date": c.start_date, "signed_at": now, "state": ACTIVE, "end_serial": None, "end_reason": "",
             "end_date": None, "ended_at": None} for c in batch])
        by_bank: dict[str, list[str]] = {}
        for c in batch:
            by_bank.setdefault(c.bank_id, []).append(c.agreement_serial)
        for bank_id, serials in by_bank.items():
            for r in conn.execute(_IDS_BY_SERIAL, {"bank_id": bank_id, "serials": serials}):
                ids[(bank_id, r.agreement_serial)] = int(r.agreement_id)
        new_index = [c for c in batch if c.account_no not in index]
        again = [c for c in batch if c.account_no in index]
        if new_index:
            bulk_insert(conn, T_AGR, [
                {"account_no": c.account_no, "bank_id": c.bank_id, "signed_on": c.start_date, "active": True,
                 "agreement_id": ids[(c.bank_id, c.agreement_serial)], "debit_limit_fen": c.debit_limit_fen}
                for c in new_index])
        for c in again:
            conn.execute(_UPDATE_INDEX, {"acct": c.account_no, "v_bank": c.bank_id, "v_start": c.start_date,
                                         "v_id": ids[(c.bank_id, c.agreement_serial)],
                                         "v_limit": c.debit_limit_fen})
        bulk_insert(conn, T_JOURNAL, [_journal("AGREE_SIGN", c.bank_id, c.agreement_serial, c.account_no,
                                                   ACTIVE, now) for c in batch])
    return [ids[(c.bank_id, c.agreement_serial)] for c in cmds]


# PostgreSQL: the accounts locked and read with their index rows in one statement, then the
# records, the index rows and the journal lines written by one statement per batch (ids from
# RETURNING, not read back by serial). Records and journal lines are numbered in command order.
_PG_LOCK_WITH_INDEX = ("SELECT c.account_no, c.status, a.active FROM customers c "
                       "LEFT JOIN agreements a ON a.account_no = c.account_no "
                       "WHERE c.account_no = ANY(%(accts)s::text[]) ORDER BY c.account_no FOR UPDATE OF c")
_PG_SIGN = """
WITH cmd AS (
  SELECT * FROM unnest(%(bank)s::text[], %(serial)s::text[], %(acct)s::text[], %(ref)s::text[],
                       %(lim)s::bigint[], %(start)s::date[]) WITH ORDINALITY
         AS t(bank_id, agreement_serial, account_no, savings_account_ref, debit_limit_fen, start_date, ord)),
rec AS (
  INSERT INTO agreement_records (bank_id, agreement_serial, account_no, savings_account_ref, debit_limit_fen,
                                 start_date, signed_at, state, end_serial, end_reason, end_date, ended_at)
  SELECT bank_id, agreement_serial, account_no, savings_account_ref, debit_limit_fen, start_date,
         %(now)s, %(active)s, NULL, '', NULL, NULL FROM cmd ORDER BY ord
  RETURNING agreement_id, bank_id, agreement_serial, account_no, start_date, debit_limit_fen),
idx AS (
  INSERT INTO agreements (account_no, bank_id, signed_on, active, agreement_id, debit_limit_fen)
  SELECT account_no, bank_id, start_date, true, agreement_id, debit_limit_fen FROM rec
  ON CONFLICT (account_no) DO UPDATE SET bank_id = EXCLUDED.bank_id, signed_on = EXCLUDED.signed_on,
    active = true, agreement_id = EXCLUDED.agreement_id, debit_limit_fen = EXCLUDED.debit_limit_fen),
jr AS (
  INSERT INTO journal (at, bank_id, rpc, serial, original_serial, account_no, amount_fen, outcome, payment_id)
  SELECT %(now)s, bank_id, 'AGREE_SIGN', agreement_serial, '', account_no, 0, %(active)s, NULL
  FROM cmd ORDER BY ord)
SELECT bank_id, agreement_serial, agreement_id FROM rec"""
PG_SIGN_BATCH_MAX = 10_000  # agreements per statement on PostgreSQL


def _sign_many_pg(conn: Connection, cmds: Sequence[SignCommand], now: dt.datetime) -> list[int]:
    """sign_many_in_tx on PostgreSQL: the same checks under the same account
    locks, then the same rows, in two statements per batch."""
    ids: dict[tuple[str, str], int] = {}
    for start in range(0, len(cmds), PG_SIGN_BATCH_MAX):
        batch = cmds[start:start + PG_SIGN_BATCH_MAX]
        found = {r[0]: (r[1], r[2]) for r in conn.exec_driver_sql(
            _PG_LOCK_WITH_INDEX, {"accts": sorted(c.account_no for c in batch)})}
        for c in batch:
            if c.account_no not in found:
                raise AccountNotFound(f"account {c.account_no} not found")
            status, active = found[c.account_no]
            if status != "OPEN":
                raise AccountClosed(f"account {c.account_no} is closed")
            if active:
                raise AgreementActive(f"account {c.account_no} already has an active auto-debit agreement")
            if c.start_date is None:
                raise ValueError("sign_many_in_tx needs validated commands (start_date resolved)")
        rows = conn.exec_driver_sql(_PG_SIGN, {
            "bank": [c.bank_id for c in batch], "serial": [c.agreement_serial for c in batch],
            "acct": [c.account_no for c in batch], "ref": [c.savings_account_ref for c in batch],
            "lim": [c.debit_limit_fen for c in batch], "start": [c.start_date for c in batch],
            "now": now, "active": ACTIVE})
        for bank_id, serial, agreement_id in rows:
            ids[(bank_id, serial)] = int(agreement_id)
    return [ids[(c.bank_id, c.agreement_serial)] for c in cmds]


def _sign_tx(engine: Engine, cmd: SignCommand, today: dt.date, now: dt.datetime) -> SignResult:
    with engine.begin() as conn:
        # The account lock first: a concurrent request with the same serial has then committed or
        # not started, and the (locking) serial read below sees it on every back end.
        conn.execute(_LOCK_CUSTOMERS, {"accts": [cmd.account_no]}).all()
        stored = conn.execute(_BY_SIGN_SERIAL_LOCKED,
                              {"bank_id": cmd.bank_id, "serial": cmd.agreement_serial}).first()
        if stored is not None:
            return _answer_sign_replay(view_of(stored), cmd)
        (agreement_id,) = sign_many_in_tx(conn, [cmd], today, now)
        row = conn.execute(sa.select(T_REC).where(T_REC.c.agreement_id == agreement_id)).one()
        return SignResult(view_of(row), replayed=False)


def _answer_sign_replay(stored: AgreementView, cmd: SignCommand) -> SignResult:
    if not same_sign(stored, cmd):
        raise SerialConflict(f"agreement_serial {cmd.agreement_serial} was used for another agreement",
                             field="agreement_serial")
    return SignResult(stored, replayed=True)


def sign(engine: Engine, cmd: SignCommand, today: dt.date, now: dt.datetime) -> SignResult:
    """Signs one agreement (SignAgreement). `cmd` is validated here."""
    original = cmd
    cmd = validate_sign(cmd, today)
    try:
        return _sign_tx(engine, cmd, today, now)
    except IntegrityError:
        # The same serial committed concurrently: answer as a replay would.
        with engine.connect() as conn:
            stored = conn.execute(_BY_SIGN_SERIAL, {"bank_id": cmd.bank_id, "serial": cmd.agreement_serial}).first()
        if stored is None:
            raise
        return _answer_sign_replay(view_of(stored), original)


def end_in_tx(conn: Connection, cmd: EndCommand, today: dt.date, now: dt.datetime) -> EndResult:
    """Ends the bank's active agreement on the account and withdraws its unanswered notices."""
    exists = bool(conn.execute(_LOCK_CUSTOMERS, {"accts": [cmd.account_no]}).all())
    stored = conn.execute(_BY_END_SERIAL_LOCKED, {"bank_id": cmd.bank_id, "serial": cmd.end_serial}).first()
    if stored is not None:
        if stored.account_no != cmd.account_no:
            raise SerialConflict(f"end_serial {cmd.end_serial} ended another agreement", field="end_serial")
        withdrawn = int(conn.execute(_WITHDRAWN_OF, {"a_id": stored.agreement_id}).scalar_one())
        return EndResult(view_of(stored), replayed=True, withdrawn_notices=withdrawn)
    if not exists:
        raise AccountNotFound(f"account {cmd.account_no} not found")
    active = conn.execute(_ACTIVE_OF_BANK, {"account_no": cmd.account_no, "bank_id": cmd.bank_id}).first()
    if active is None:
        raise AgreementNotFound(f"no active auto-debit agreement of this bank for account {cmd.account_no}")
    n = conn.execute(_END_RECORD, {"a_id": active.agreement_id, "e_serial": cmd.end_serial, "e_reason": cmd.reason,
                                   "e_date": today, "e_at": now}).rowcount
    if n != 1:
        raise RuntimeError(f"agreement {active.agreement_id} changed under its account lock")
    conn.execute(_DEACTIVATE_INDEX, {"acct": cmd.account_no, "a_id": active.agreement_id})
    seqs = list(conn.execute(_UNANSWERED, {"account_no": cmd.account_no, "bank_id": cmd.bank_id}).scalars())
    if seqs:
        conn.execute(T_WD.insert(), [{"bank_id": cmd.bank_id, "seq": s, "account_no": cmd.account_no,
                                      "agreement_id": active.agreement_id, "withdrawn_at": now} for s in seqs])
    conn.execute(T_JOURNAL.insert(), [_journal("AGREE_END", cmd.bank_id, cmd.end_serial, cmd.account_no, ENDED, now)])
    row = conn.execute(sa.select(T_REC).where(T_REC.c.agreement_id == active.agreement_id)).one()
    return EndResult(view_of(row), replayed=False, withdrawn_notices=len(seqs))


def end(engine: Engine, cmd: EndCommand, today: dt.date, now: dt.datetime) -> EndResult:
    """Ends one agreement (EndAgreement). `cmd` is validated here."""
    cmd = validate_end(cmd)
    try:
        with engine.begin() as conn:
            return end_in_tx(conn, cmd, today, now)
    except IntegrityError:
        # The same end serial committed concurrently: answer as a replay would.
        with engine.begin() as conn:
            return end_in_tx(conn, cmd, today, now)


def withdrawn_among(conn: Connection, bank_id: str, seqs: Sequence[int]) -> set[int]:
    """Which of these feed seqs of the bank were withdrawn (their agreement ended before a result)."""
    if not seqs:
        return set()
    wanted = set(seqs)
    rows = conn.execute(_WITHDRAWN_AMONG, {"bank_id": bank_id, "lo": min(wanted), "hi": max(wanted)}).scalars()
    return {int(s) for s in rows if s in wanted}


def list_agreements(engines: Sequence[Engine], bank_id: str, *, page_size: int, page_token: str = "",
                    account_no: str = "", active_only: bool = False) -> AgreementPage:
    """The bank's own agreements, by engine then id; a token resumes after the last one listed."""
    size = page_size_of(page_size)
    if account_no:
        fields.account_no(account_no)
    engine_index, after_id = _parse_token(page_token, len(engines))
    out: list[AgreementView] = []
    for i in range(engine_index, len(engines)):
        q = sa.select(T_REC).where(T_REC.c.bank_id == bank_id, T_REC.c.agreement_id > (after_id if i == engine_index
                                                                                        else 0))
        if account_no:
            q = q.where(T_REC.c.account_no == account_no)
        if active_only:
            q = q.where(T_REC.c.state == ACTIVE)
        q = q.order_by(T_REC.c.agreement_id).limit(size - len(out) + 1)
        with engines[i].connect() as conn:
            rows = conn.execute(q).all()
        for r in rows:
            if len(out) == size:
                return AgreementPage(out, _page_token(i, out[-1].agreement_id))
            out.append(view_of(r))
        if len(out) == size and i + 1 < len(engines):
            return AgreementPage(out, _page_token(i, out[-1].agreement_id))
    return AgreementPage(out, "")
