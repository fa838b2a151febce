"""BANK_ONLY lines of a reconciled day posted set-based: a page of lines costs
a handful of statements, not a Pay transaction each.

The same rule as one Pay (payments.post_payment_in_tx), applied in line
order: the account's unpaid bills with late fees as of the reconciled day
(allocation.bills_due), allocate_payment over them, the remainder prepaid
credit; the payment row with arrears and prepaid after, its allocations,
the bills it settles, the prepaid ledger line and the journal line. Several
lines of one account see each other's effect, in line order, exactly as
one-by-one posting would. A line whose account is unknown or closed, or
whose serial is taken, is demoted to MISMATCH with the one-by-one path's
words. Property-tested equal to the one-by-one path
(tests/mis_adapter/test_recon_bulk.py).

UTILITY_ONLY lines are reversed the same way (`reverse_utility_only`), as
payments.reverse_payment_in_tx does one at a time: allocations taken back
from the bills, the prepaid credit the payment added taken back with a
REVERSAL ledger line, the payment REVERSED on the reconciled day; a line
that cannot be restored is demoted with that path's words.

Runs inside the day-closing transaction; never commits."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mis_adapter import matching as m
from mis_adapter.allocation import allocate_payment, bill_status, bills_due
from mis_adapter.db.base import table_of
from mis_adapter.db.core import AllocationRow, BillRow, Customer, JournalEntry, Payment, PrepaidEntry
from mis_adapter.db.recon import ReconLine
from mis_adapter.late_fee import LateFeeRates
from yindian_common.bulk_sql import InList, bulk_insert, list_param

__all__ = ["post_bank_only", "reverse_utility_only"]

DETAIL_MAX = 128
POSTED = "POSTED"

T_PAY = table_of(Payment)
T_CUST = table_of(Customer)
T_BILL = table_of(BillRow)
T_ALLOC = table_of(AllocationRow)
T_PREPAID = table_of(PrepaidEntry)
T_JOURNAL = table_of(JournalEntry)
T_LINE = table_of(ReconLine)
_b = sa.bindparam

_LOCK_CUSTOMERS = (sa.select(T_CUST.c.account_no, T_CUST.c.branch_code, T_CUST.c.tariff_class, T_CUST.c.status,
                             T_CUST.c.prepaid_fen)
                   .where(InList(T_CUST.c.account_no, "accts")).order_by(T_CUST.c.account_no).with_for_update())
_TAKEN = sa.select(T_PAY.c.bank_serial).where(T_PAY.c.bank_id == _b("bank_id"), InList(T_PAY.c.bank_serial, "serials"))
_IDS = (sa.select(T_PAY.c.bank_serial, T_PAY.c.payment_id)
        .where(T_PAY.c.bank_id == _b("bank_id"), InList(T_PAY.c.bank_serial, "serials")))
_UNPAID = (sa.select(T_BILL.c.bill_id, T_BILL.c.account_no, T_BILL.c.period, T_BILL.c.amount_fen,
                     T_BILL.c.prepaid_applied_fen, T_BILL.c.principal_paid_fen, T_BILL.c.late_fee_paid_fen,
                     T_BILL.c.accrual_micro, T_BILL.c.accrual_date)
           .where(InList(T_BILL.c.account_no, "accts"), T_BILL.c.status != "PAID")
           .order_by(T_BILL.c.account_no, T_BILL.c.period, T_BILL.c.bill_id))
_UPDATE_BILL = (T_BILL.update().where(T_BILL.c.bill_id == _b("b_id"))
                .values(principal_paid_fen=_b("principal_paid"), late_fee_paid_fen=_b("fee_paid"),
                        accrual_micro=_b("micro"), accrual_date=_b("micro_date"), status=_b("new_status"),
                        paid_on=_b("new_paid_on")))
_SET_PREPAID = T_CUST.update().where(T_CUST.c.account_no == _b("acct")).values(prepaid_fen=_b("prepaid"))
_DEMOTE = T_LINE.update().where(T_LINE.c.line_id == _b("l_id")).values(outcome=m.MISMATCH, detail=_b("why"))


# PostgreSQL: one UPDATE ... FROM unnest(arrays) per set (executemany there is a statement per row).
_PG_SET_BILLS = """
UPDATE bills SET principal_paid_fen = v.principal_paid, late_fee_paid_fen = v.fee_paid, accrual_micro = v.micro,
       accrual_date = v.micro_date, status = v.new_status, paid_on = v.new_paid_on
FROM unnest(%(b_id)s::bigint[], %(principal_paid)s::bigint[], %(fee_paid)s::bigint[], %(micro)s::bigint[],
            %(micro_date)s::date[], %(new_status)s::text[], %(new_paid_on)s::date[])
     AS v(b_id, principal_paid, fee_paid, micro, micro_date, new_status, new_paid_on)
WHERE bills.bill_id = v.b_id
"""
_PG_SET_PREPAID = """
UPDATE customers SET prepaid_fen = v.prepaid FROM unnest(%(acct)s::text[], %(prepaid)s::bigint[]) AS v(acct, prepaid)
WHERE customers.account_no = v.acct
"""


def _update_each(conn: Connection, stmt: Any, pg_sql: str, rows: list[dict[str, Any]]) -> None:
    """One UPDATE per row (executemany), or on PostgreSQL one UPDATE for all rows, its
    arrays sent as text literals (psycopg dumps a list element by element in Python)."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(pg_sql, {k: _pg_array_text([r[k] for r in rows]) for k in rows[0]})
    else:
        conn.execute(stmt, rows)


def _pg_array_text(values: list[Any]) -> str:
    """A PostgreSQL array literal of integers, dates, NULLs and bill states (no quoting needed:
    none holds a comma, brace, quote, backslash or space)."""
    return "{" + ",".join("NULL" if v is None else v.isoformat() if isinstance(v, dt.date) else str(v)
                          for v in values) + "}"


def _insert(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """bulk_insert; on PostgreSQL a COPY (rows formatted by psycopg's C code, no arrays to dump)."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        bulk_insert(conn, table, rows)
        return
    _copy(conn, table, list(rows[0]), (tuple(r.values()) for r in rows))


def _copy(conn: Connection, table: sa.Table, cols: list[str], rows: Iterable[tuple[Any, ...]]) -> None:
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY {table.name} ({', '.join(cols)}) FROM STDIN") as copy:
        for r in rows:
            copy.write_row(r)


# The sequence is looked up once (an InitPlan returning the regclass), not once per row: pg_get_serial_sequence
# is only STABLE, so in the target list it runs for every id (100k ids: 0.5-0.9 s against 0.07-0.10 s).
_PG_NEXT_PAYMENT_IDS = ("SELECT nextval((SELECT CAST(pg_get_serial_sequence('payments', 'payment_id') AS regclass))) "
                        "FROM generate_series(1, %(n)s)")


def _insert_payments(conn: Connection, rows: list[dict[str, Any]], bank_id: str) -> dict[str, int]:
    """Inserts the payments; returns their ids by serial. PostgreSQL: ids drawn from the
    sequence first, so that the rows go in by COPY and need no read back."""
    if conn.dialect.name == "postgresql":
        ids = [r[0] for r in conn.exec_driver_sql(_PG_NEXT_PAYMENT_IDS, {"n": len(rows)})]
        _copy(conn, T_PAY, ["payment_id", *rows[0]], ((i, *r.values()) for i, r in zip(ids, rows, strict=True)))
        return {r["bank_serial"]: i for i, r in zip(ids, rows, strict=True)}
    bulk_insert(conn, T_PAY, rows)
    serials = [p["bank_serial"] for p in rows]
    return {r.bank_serial: r.payment_id for r in conn.execute(_IDS, {"bank_id": bank_id,
                                                                    "serials": list_param(conn, serials)})}


@dataclass
class _Bill:
    """A bill as the allocation rule reads it, updated as the page's payments settle it."""
    bill_id: int
    period: str
    amount_fen: int
    prepaid_applied_fen: int
    principal_paid_fen: int
    late_fee_paid_fen: int
    accrual_micro: int
    accrual_date: dt.date


@dataclass
class _Writes:
    payments: list[dict[str, Any]]
    allocations: list[tuple[str, dict[str, Any]]]      # (serial, row without payment_id)
    prepaid: list[tuple[str, dict[str, Any]]]
    journal: list[tuple[str, dict[str, Any]]]
    demoted: list[dict[str, Any]]


def post_bank_only(conn: Connection, lines: Sequence[Any], *, bank_id: str, day: dt.date, rates: LateFeeRates,
                   now: dt.datetime, channel: str) -> None:
    """Posts `lines` (recon_lines rows, BANK_ONLY, in line order) as payments of `day`."""
    if not lines:
        return
    accts = sorted({ln.bank_account_no for ln in lines})
    serials = [ln.bank_serial for ln in lines]
    custs = {r.account_no: r for r in conn.execute(_LOCK_CUSTOMERS, {"accts": list_param(conn, accts)})}
    taken = {r.bank_serial for r in conn.execute(_TAKEN, {"bank_id": bank_id,
                                                          "serials": list_param(conn, serials)})}
    bills: dict[str, list[_Bill]] = {}
    for bill_id, account_no, *rest in conn.execute(_UNPAID, {"accts": list_param(conn, accts)}):
        bills.setdefault(account_no, []).append(_Bill(bill_id, *rest))  # _UNPAID's columns in _Bill's order
    prepaid = {a: int(c.prepaid_fen) for a, c in custs.items()}
    w = _Writes([], [], [], [], [])
    touched: dict[int, _Bill] = {}
    for ln in lines:
        why = _refusal(ln, custs, taken)
        if why:
            w.demoted.append({"l_id": ln.line_id, "why": f"not applied: {why}"[:DETAIL_MAX]})
            continue
        taken.add(ln.bank_serial)
        cust = custs[ln.bank_account_no]
        _post_one(ln, cust, bills.setdefault(ln.bank_account_no, []), prepaid, touched, w,
                  bank_id=bank_id, day=day, rates=rates, now=now, channel=channel)
    _write(conn, w, touched, prepaid, bank_id, day)


def _refusal(ln: Any, custs: dict[str, Any], taken: set[str]) -> str:
    cust = custs.get(ln.bank_account_no)
    if cust is None:
        return f"account {ln.bank_account_no} not found"
    if cust.status != "OPEN":
        return f"account {ln.bank_account_no} is closed"
    if ln.bank_serial in taken:
        return "serial taken meanwhile"
    return ""


def _post_one(ln: Any, cust: Any, unpaid: list[_Bill], prepaid: dict[str, int], touched: dict[int, _Bill],
              w: _Writes, *, bank_id: str, day: dt.date, rates: LateFeeRates, now: dt.datetime,
              channel: str) -> None:
    """One payment, as post_payment_in_tx computes it, on the page's running state."""
    acct, amount = ln.bank_account_no, ln.bank_amount_fen
    due = bills_due(unpaid, cust.tariff_class, day, rates)
    plan = allocate_payment(amount, [d for _, d, _ in due])
    by_id = {d.bill_id: (row, micro) for row, d, micro in due}
    arrears_after = sum(d.principal_due_fen for _, d, _ in due) - sum(a.principal_fen for a in plan.allocations)
    prepaid[acct] += plan.prepaid_fen
    w.payments.append({
        "bank_id": bank_id, "bank_serial": ln.bank_serial, "state": POSTED, "account_no": acct,
        "branch_code": cust.branch_code, "amount_fen": amount, "channel": channel, "outlet_code": "",
        "teller_id": "", "bank_balance_fen": None, "settlement_date": day, "posted_at": now,
        "arrears_after_fen": arrears_after, "prepaid_after_fen": prepaid[acct], "prepaid_added_fen": plan.prepaid_fen,
        "reversed_at": None, "reversed_on": None, "cancel_serial": None})
    for a in plan.allocations:
        w.allocations.append((ln.bank_serial, {"bill_id": a.bill_id, "late_fee_fen": a.late_fee_fen,
                                               "principal_fen": a.principal_fen}))
        bill, micro = by_id[a.bill_id]
        bill.principal_paid_fen += a.principal_fen
        bill.late_fee_paid_fen += a.late_fee_fen
        bill.accrual_micro = micro
        bill.accrual_date = max(day, bill.accrual_date)
        touched[bill.bill_id] = bill
    unpaid[:] = [b for b in unpaid if _status(b) != "PAID"]
    if plan.prepaid_fen:
        w.prepaid.append((ln.bank_serial, {"account_no": acct, "reason": "PAYMENT", "delta_fen": plan.prepaid_fen,
                                           "balance_after_fen": prepaid[acct], "bill_id": None, "at": now}))
    w.journal.append((ln.bank_serial, {"at": now, "bank_id": bank_id, "rpc": "RECONCILE", "serial": ln.bank_serial,
                                       "original_serial": "", "account_no": acct, "amount_fen": amount,
                                       "outcome": "BANK_ONLY_POSTED"}))


def _status(b: _Bill) -> str:
    return bill_status(b.amount_fen, b.prepaid_applied_fen, b.principal_paid_fen, b.late_fee_paid_fen)


def _write(conn: Connection, w: _Writes, touched: dict[int, _Bill], prepaid: dict[str, int], bank_id: str,
           day: dt.date) -> None:
    if w.demoted:
        conn.execute(_DEMOTE, w.demoted)
    if not w.payments:
        return
    ids = _insert_payments(conn, w.payments, bank_id)
    if w.allocations:
        _insert(conn, T_ALLOC, [{"payment_id": ids[s], **row} for s, row in w.allocations])
    _update_each(conn, _UPDATE_BILL, _PG_SET_BILLS, [
        {"b_id": b.bill_id, "principal_paid": b.principal_paid_fen, "fee_paid": b.late_fee_paid_fen,
         "micro": b.accrual_micro, "micro_date": b.accrual_date, "new_status": _status(b),
         "new_paid_on": day if _status(b) == "PAID" else None} for b in touched.values()])
    if w.prepaid:
        accts = sorted({row["account_no"] for _s, row in w.prepaid})
        _update_each(conn, _SET_PREPAID, _PG_SET_PREPAID, [{"acct": a, "prepaid": prepaid[a]} for a in accts])
        _insert(conn, T_PREPAID, [{**row, "payment_id": ids[s]} for s, row in w.prepaid])
    _insert(conn, T_JOURNAL, [{**row, "payment_id": ids[s]} for s, row in w.journal])


# ---- UTILITY_ONLY ----
REVERSED = "REVERSED"
_PAYMENTS = sa.select(T_PAY).where(T_PAY.c.bank_id == _b("bank_id"), InList(T_PAY.c.bank_serial, "serials"))
_ALLOCS = (sa.select(T_ALLOC.c.payment_id, T_ALLOC.c.bill_id, T_ALLOC.c.late_fee_fen, T_ALLOC.c.principal_fen)
           .where(InList(T_ALLOC.c.payment_id, "ids")).order_by(T_ALLOC.c.allocation_id))
_BILLS = (sa.select(T_BILL.c.bill_id, T_BILL.c.amount_fen, T_BILL.c.prepaid_applied_fen, T_BILL.c.principal_paid_fen,
                    T_BILL.c.late_fee_paid_fen, T_BILL.c.accrual_micro, T_BILL.c.accrual_date, T_BILL.c.paid_on)
          .where(InList(T_BILL.c.bill_id, "ids")))
_COUNT_REVERSED = (sa.select(sa.func.count()).select_from(T_PAY)
                   .where(InList(T_PAY.c.payment_id, "ids"), T_PAY.c.state == "REVERSED",
                          T_PAY.c.reversed_on == _b("day", type_=sa.Date)))
_REVERSE = (T_PAY.update().where(T_PAY.c.payment_id == _b("p_id"), T_PAY.c.state == POSTED)
            .values(state=REVERSED, reversed_at=_b("at"), reversed_on=_b("day"), cancel_serial=_b("c_serial")))


@dataclass
class _Held:
    """A bill as a reversal restores it."""
    bill_id: int
    amount_fen: int
    prepaid_applied_fen: int
    principal_paid_fen: int
    late_fee_paid_fen: int
    accrual_micro: int
    accrual_date: dt.date
    paid_on: dt.date | None


def reverse_utility_only(conn: Connection, lines: Sequence[Any], *, bank_id: str, day: dt.date, now: dt.datetime,
                         cancel_serial: str) -> None:
    """Reverses the payments of `lines` (recon_lines rows, UTILITY_ONLY, in line order)."""
    if not lines:
        return
    serials = [ln.bank_serial for ln in lines]
    pays = {p.bank_serial: p for p in conn.execute(_PAYMENTS, {"bank_id": bank_id,
                                                               "serials": list_param(conn, serials)})}
    accts = sorted({p.account_no for p in pays.values() if p.account_no})
    prepaid = {r.account_no: int(r.prepaid_fen) for r in conn.execute(_LOCK_CUSTOMERS,
                                                                      {"accts": list_param(conn, accts)})}
    allocs: dict[int, list[Any]] = {}
    for a in conn.execute(_ALLOCS, {"ids": list_param(conn, [p.payment_id for p in pays.values()])}):
        allocs.setdefault(a.payment_id, []).append(a)
    bill_ids = sorted({a.bill_id for rows in allocs.values() for a in rows})
    held = {r.bill_id: _Held(r.bill_id, r.amount_fen, r.prepaid_applied_fen, r.principal_paid_fen,
                             r.late_fee_paid_fen, r.accrual_micro, r.accrual_date, r.paid_on)
            for r in conn.execute(_BILLS, {"ids": list_param(conn, bill_ids)})}
    demoted: list[dict[str, Any]] = []
    reversed_: list[Any] = []
    ledger: list[dict[str, Any]] = []
    touched: dict[int, _Held] = {}
    for ln in lines:
        p = pays[ln.bank_serial]
        why = _restore(p, allocs.get(p.payment_id, []), held, prepaid, touched)
        if why:
            demoted.append({"l_id": ln.line_id, "why": f"not applied: {why}"[:DETAIL_MAX]})
            continue
        reversed_.append(p)
        if p.prepaid_added_fen:
            ledger.append({"account_no": p.account_no, "reason": "REVERSAL", "delta_fen": -p.prepaid_added_fen,
                           "balance_after_fen": prepaid[p.account_no], "payment_id": p.payment_id, "bill_id": None,
                           "at": now})
    if demoted:
        conn.execute(_DEMOTE, demoted)
    if not reversed_:
        return
    _update_each(conn, _UPDATE_BILL, _PG_SET_BILLS, [
        {"b_id": b.bill_id, "principal_paid": b.principal_paid_fen, "fee_paid": b.late_fee_paid_fen,
         "micro": b.accrual_micro, "micro_date": b.accrual_date, "new_status": _held_status(b),
         "new_paid_on": b.paid_on if _held_status(b) == "PAID" else None} for b in touched.values()])
    if ledger:
        accts_changed = sorted({row["account_no"] for row in ledger})
        _update_each(conn, _SET_PREPAID, _PG_SET_PREPAID, [{"acct": a, "prepaid": prepaid[a]} for a in accts_changed])
        _insert(conn, T_PREPAID, ledger)
    ids = [p.payment_id for p in reversed_]
    conn.execute(_REVERSE, [{"p_id": i, "at": now, "day": day, "c_serial": cancel_serial} for i in ids])
    n = conn.execute(_COUNT_REVERSED, {"ids": list_param(conn, ids), "day": day}).scalar_one()
    if n != len(ids):  # a payment stopped being POSTED under our account locks: a bug, not an operating error
        raise RuntimeError(f"reversed {n} of {len(ids)} payments")
    _insert(conn, T_JOURNAL, [{"at": now, "bank_id": bank_id, "rpc": "RECONCILE", "serial": p.bank_serial,
                                   "original_serial": "", "account_no": p.account_no or "", "amount_fen": p.amount_fen,
                                   "outcome": "UTILITY_ONLY_REVERSED", "payment_id": p.payment_id}
                                  for p in reversed_])


def _restore(p: Any, allocs: list[Any], held: dict[int, _Held], prepaid: dict[str, int],
             touched: dict[int, _Held]) -> str:
    """Takes one payment back on the running state; a refusal (with the one-by-one path's words) changes nothing."""
    after: dict[int, tuple[int, int]] = {}
    for a in allocs:
        b = held[a.bill_id]
        principal, fee = after.get(b.bill_id, (b.principal_paid_fen, b.late_fee_paid_fen))
        principal, fee = principal - a.principal_fen, fee - a.late_fee_fen
        if principal < 0 or fee < 0:
            return f"bill {b.bill_id} cannot be restored"
        after[b.bill_id] = (principal, fee)
    if p.prepaid_added_fen and prepaid[p.account_no] - p.prepaid_added_fen < 0:
        return f"prepaid credit of payment {p.bank_serial} was already applied to new bills"
    if p.state != POSTED:
        return f"payment {p.bank_serial} is no longer posted"
    for bill_id, (principal, fee) in after.items():
        b = held[bill_id]
        b.principal_paid_fen, b.late_fee_paid_fen = principal, fee
        touched[bill_id] = b
    if p.prepaid_added_fen:
        prepaid[p.account_no] -= p.prepaid_added_fen
    return ""


def _held_status(b: _Held) -> str:
    return bill_status(b.amount_fen, b.prepaid_applied_fen, b.principal_paid_fen, b.late_fee_paid_fen)
