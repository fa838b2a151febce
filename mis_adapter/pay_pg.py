"""Pay on PostgreSQL in two statements and a COMMIT (issue 11).

READ: one statement that bounds this transaction's waits (`set_config(...,
true)`, i.e. SET LOCAL, no extra round trip), takes the bank-day lock SHARED
(banks.py: the advisory lock reconciliation takes EXCLUSIVE), locks the
account row and reads all a pay needs: the customer, its unpaid bills, the
serial, whether today and tomorrow are reconciled and whether the bank is
suspended. The bank-day lock is taken in a MATERIALIZED CTE that the locked
row is joined with, so it is held before the account row is locked (the
same order as everywhere: bank-day, then accounts).

WRITE: one statement (data-modifying CTEs over `unnest` arrays) that writes
the payment, its allocations, the bills, any prepaid credit with its ledger
line and the journal line, guarded: it writes nothing unless the account
row, the unpaid bills (their xmin versions) and the bank's reconciled days
are exactly as READ saw them. READ's snapshot may predate a wait for the
account lock or the bank-day lock (READ COMMITTED takes the snapshot when
the statement starts); WRITE's snapshot is taken after both locks are held,
so the guard sees every commit that READ could have missed, and nothing can
change them afterwards until we commit. When the guard fails (only after
such a wait) Pay reads again in the same transaction, now without waiting.

Statements are plain driver SQL strings built once, so psycopg prepares them
after its fifth execution on a connection and SQLAlchemy compiles nothing."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from mis_adapter.pay_plan import PaymentEffects

READ_FOR_PAY = """
WITH bounds AS MATERIALIZED (
  SELECT set_config('lock_timeout', %(wait_ms)s, true) AS lock_bound,
         set_config('idle_in_transaction_session_timeout', %(idle_ms)s, true) AS idle_bound,
         set_config('statement_timeout', %(wait_ms)s, true) AS statement_bound,
         pg_advisory_xact_lock_shared(%(day_key)s::bigint) AS day_lock)
SELECT c.branch_code, c.tariff_class, c.status, c.prepaid_fen, c.xmin::text AS c_version,
       EXISTS (SELECT 1 FROM reconciled_days r
               WHERE r.bank_id = %(bank_id)s AND r.settlement_date = %(day)s::date) AS closed_today,
       EXISTS (SELECT 1 FROM reconciled_days r
               WHERE r.bank_id = %(bank_id)s AND r.settlement_date = %(next_day)s::date) AS closed_next,
       (SELECT p.payment_id FROM payments p
        WHERE p.bank_id = %(bank_id)s AND p.bank_serial = %(serial)s) AS taken_id,
       coalesce((SELECT k.suspended FROM banks k WHERE k.bank_id = %(bank_id)s), false) AS suspended,
       (SELECT k.suspended_reason FROM banks k WHERE k.bank_id = %(bank_id)s) AS suspended_reason,
       b.bill_id, b.period, b.amount_fen, b.prepaid_applied_fen, b.principal_paid_fen, b.late_fee_paid_fen,
       b.accrual_micro, b.accrual_date, b.xmin::text AS b_version
FROM bounds CROSS JOIN customers c
LEFT JOIN bills b ON b.account_no = c.account_no AND b.status <> 'PAID'
WHERE c.account_no = %(account_no)s
ORDER BY b.period, b.bill_id
FOR UPDATE OF c
"""

WRITE_PAY = """
WITH guard AS (
  SELECT (SELECT c.xmin::text FROM customers c WHERE c.account_no = %(account_no)s) = %(c_version)s
     AND coalesce((SELECT string_agg(b.bill_id::text || ':' || b.xmin::text, ',' ORDER BY b.bill_id)
                   FROM bills b WHERE b.account_no = %(account_no)s AND b.status <> 'PAID'), '') = %(bills_version)s
     AND EXISTS (SELECT 1 FROM reconciled_days r
                 WHERE r.bank_id = %(bank_id)s AND r.settlement_date = %(day)s::date) = %(closed_today)s::boolean
     AND EXISTS (SELECT 1 FROM reconciled_days r
                 WHERE r.bank_id = %(bank_id)s AND r.settlement_date = %(next_day)s::date) = %(closed_next)s::boolean
     AS ok
), pay AS (
  INSERT INTO payments (bank_id, bank_serial, state, account_no, branch_code, amount_fen, channel, outlet_code,
                        teller_id, bank_balance_fen, settlement_date, posted_at, arrears_after_fen,
                        prepaid_after_fen, prepaid_added_fen, reversed_at, reversed_on, cancel_serial)
  SELECT %(bank_id)s, %(serial)s, 'POSTED', %(account_no)s, %(branch_code)s, %(amount_fen)s::bigint, %(channel)s,
         %(outlet_code)s, %(teller_id)s, %(bank_balance_fen)s::bigint, %(settlement)s::date,
         %(now)s::timestamptz, %(arrears_after)s::bigint, %(prepaid_after)s::bigint, %(prepaid_delta)s::bigint,
         NULL, NULL, NULL
  FROM guard WHERE guard.ok
  RETURNING payment_id
), alloc AS (
  INSERT INTO allocations (payment_id, bill_id, late_fee_fen, principal_fen)
  SELECT pay.payment_id, a.bill_id, a.fee, a.principal
  FROM pay, unnest(%(a_bill)s::bigint[], %(a_fee)s::bigint[], %(a_principal)s::bigint[])
       WITH ORDINALITY AS a(bill_id, fee, principal, n)
  ORDER BY a.n
), bill_update AS (
  UPDATE bills b SET principal_paid_fen = u.principal_paid, late_fee_paid_fen = u.fee_paid,
                     accrual_micro = u.micro, accrual_date = u.micro_date, status = u.new_status,
                     paid_on = u.paid_on
  FROM pay, unnest(%(u_bill)s::bigint[], %(u_principal)s::bigint[], %(u_fee)s::bigint[], %(u_micro)s::bigint[],
                   %(u_micro_date)s::date[], %(u_status)s::text[], %(u_paid_on)s::date[])
       AS u(bill_id, principal_paid, fee_paid, micro, micro_date, new_status, paid_on)
  WHERE b.bill_id = u.bill_id
), credit AS (
  UPDATE customers c SET prepaid_fen = c.prepaid_fen + %(prepaid_delta)s::bigint
  FROM pay WHERE c.account_no = %(account_no)s AND %(prepaid_delta)s::bigint <> 0
), ledger AS (
  INSERT INTO prepaid_ledger (account_no, reason, delta_fen, balance_after_fen, payment_id, bill_id, at)
  SELECT %(account_no)s, 'PAYMENT', %(prepaid_delta)s::bigint, %(prepaid_after)s::bigint, pay.payment_id, NULL,
         %(now)s::timestamptz
  FROM pay WHERE %(prepaid_delta)s::bigint <> 0
), journal AS (
  INSERT INTO journal (at, bank_id, rpc, serial, original_serial, account_no, amount_fen, outcome, payment_id)
  SELECT %(now)s::timestamptz, %(bank_id)s, 'PAY', %(serial)s, '', %(account_no)s, %(amount_fen)s::bigint,
         'POSTED', pay.payment_id
  FROM pay
)
SELECT payment_id FROM pay
"""


@dataclass(frozen=True)
class PayRead:
    """What READ saw: the customer (None: no such account), its unpaid bills in period order, and
    the versions WRITE's guard compares."""
    customer: Any
    bills: tuple[Any, ...]
    bills_version: str


def read_for_pay(conn: Connection, *, account_no: str, bank_id: str, serial: str, day: dt.date,
                 day_key: int, wait_ms: int, idle_ms: int) -> PayRead:
    rows = conn.exec_driver_sql(READ_FOR_PAY, {
        "account_no": account_no, "bank_id": bank_id, "serial": serial, "day": day,
        "next_day": day + dt.timedelta(days=1), "day_key": day_key, "wait_ms": str(wait_ms),
        "idle_ms": str(idle_ms)}).all()
    if not rows:
        return PayRead(None, (), "")
    bills = tuple(r for r in rows if r.bill_id is not None)
    version = ",".join(f"{r.bill_id}:{r.b_version}" for r in sorted(bills, key=lambda r: r.bill_id))
    return PayRead(rows[0], bills, version)


def write_pay(conn: Connection, seen: PayRead, effects: PaymentEffects, *, cmd: Any, day: dt.date,
              settlement: dt.date, now: dt.datetime) -> int | None:
    """The new payment's id, or None when the guard found the account changed since READ."""
    c = seen.customer
    allocs = effects.plan.allocations
    ups: Sequence[Any] = effects.bill_updates
    row = conn.exec_driver_sql(WRITE_PAY, {
        "account_no": cmd.account_no, "bank_id": cmd.bank_id, "serial": cmd.bank_serial,
        "c_version": c.c_version, "bills_version": seen.bills_version, "day": day,
        "next_day": day + dt.timedelta(days=1), "closed_today": bool(c.closed_today),
        "closed_next": bool(c.closed_next), "branch_code": c.branch_code, "amount_fen": cmd.amount_fen,
        "channel": cmd.channel, "outlet_code": cmd.outlet_code, "teller_id": cmd.teller_id,
        "bank_balance_fen": cmd.bank_balance_fen, "settlement": settlement, "now": now,
        "arrears_after": effects.arrears_after_fen, "prepaid_after": effects.prepaid_after_fen,
        "prepaid_delta": effects.plan.prepaid_fen,
        "a_bill": [a.bill_id for a in allocs], "a_fee": [a.late_fee_fen for a in allocs],
        "a_principal": [a.principal_fen for a in allocs],
        "u_bill": [u.bill_id for u in ups], "u_principal": [u.principal_paid_fen for u in ups],
        "u_fee": [u.late_fee_paid_fen for u in ups], "u_micro": [u.accrual_micro for u in ups],
        "u_micro_date": [u.accrual_date for u in ups], "u_status": [u.status for u in ups],
        "u_paid_on": [u.paid_on for u in ups]}).first()
    return None if row is None else int(row.payment_id)
