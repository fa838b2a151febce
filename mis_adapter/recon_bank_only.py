"""The common case of a day's BANK_ONLY lines posted in SQL, a few statements
for the whole day whatever its size: each payment covers its account's
unpaid bills oldest first, each bill's late fee before its principal, the
remainder prepaid credit (allocation.allocate_payment).

Why this is the same rule as one Pay after another: on one account, with late
fees as of the reconciled day, what is due does not change between two of
the day's payments except by what the earlier ones paid (a bill they touch
has its accrual carried to that day, so it accrues nothing more that day).
Laid end to end in (period, bill_id) order, the dues are intervals on one
axis: bill i's fee then its principal. The account's lines, laid end to end
in line order, are intervals on the same axis, and a payment pays exactly
the overlap of its interval with each due one; what lies beyond the last
bill is prepaid credit. Running sums (window functions) give both axes.

Only lines whose account is OPEN and is not also reversed that day
(UTILITY_ONLY) go this way, all of an account's lines or none (a serial
taken meanwhile: none of the day's); every other line is left to the paged
path of recon_bulk (demotions keep its words). Property-tested equal to the
one-by-one path on every back end (tests/mis_adapter/test_recon_bulk.py).

Work tables are TEMPORARY (bo_*), each named at most once per statement
(MariaDB cannot open a temporary table twice in one statement), dropped
before returning. Runs inside the day-closing transaction; never commits."""
from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mis_adapter.db.base import table_of
from mis_adapter.db.core import INSTANT, BillRow, Customer
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.late_fee_sql import accrual_micro_sql, fee_due_from_micro_sql
from yindian_common.errors import AllocationInvariantBroken

__all__ = ["FAST_LINES", "create_work_tables", "drop_work_tables", "forget_fast_lines", "post_common_bank_only"]

T_BILL = table_of(BillRow)
T_CUST = table_of(Customer)
FAST_LINES = "bo_lines"   # the lines this module posted (line_id), for the paged path to skip
_WORK_TABLES = ("bo_lines", "bo_bills", "bo_allocs", "bo_pays")

# bo_bills and bo_pays have no key: nothing probes them by one (joins hash them), and building
# its index was ~0.1 s of backend CPU per 100k rows each; bo_lines keeps its key for the paged
# path's "not posted here" probe.
_CREATE = (
    "CREATE TEMPORARY TABLE bo_lines (line_id BIGINT PRIMARY KEY, bank_serial VARCHAR(32) NOT NULL, "
    "account_no VARCHAR(10) NOT NULL, amount_fen BIGINT NOT NULL, paid_before_fen BIGINT NOT NULL)",
    "CREATE TEMPORARY TABLE bo_bills (bill_id BIGINT NOT NULL, account_no VARCHAR(10) NOT NULL, "
    "amount_fen BIGINT NOT NULL, prepaid_applied_fen BIGINT NOT NULL, principal_paid_fen BIGINT NOT NULL, "
    "late_fee_paid_fen BIGINT NOT NULL, accrual_date DATE NOT NULL, micro BIGINT NOT NULL, "
    "fee_due_fen BIGINT NOT NULL, principal_due_fen BIGINT NOT NULL, due_before_fen BIGINT NOT NULL)",
    "CREATE TEMPORARY TABLE bo_allocs (line_id BIGINT NOT NULL, bill_id BIGINT NOT NULL, "
    "due_before_fen BIGINT NOT NULL, late_fee_fen BIGINT NOT NULL, principal_fen BIGINT NOT NULL)",
    "CREATE TEMPORARY TABLE bo_pays (line_id BIGINT NOT NULL, bank_serial VARCHAR(32) NOT NULL, "
    "account_no VARCHAR(10) NOT NULL, branch_code VARCHAR(2) NOT NULL, amount_fen BIGINT NOT NULL, "
    "arrears_after_fen BIGINT NOT NULL, prepaid_after_fen BIGINT NOT NULL, prepaid_added_fen BIGINT NOT NULL, "
    "payment_id BIGINT)",
)

# The day's BANK_ONLY lines on accounts where every line can go this way, with what the
# account's earlier lines of the day paid. A line is irregular when its account is unknown
# or closed, or reversed that day too (the day's serials are unique: staging refuses a
# repeated one before the close). Its serial is not looked up again: the matching found no
# payment with it on any day, under the exclusive bank-day lock, so none of the bank's pays
# can have taken it since; should a writer that bypasses the lock have, the payments' unique
# key refuses the INSERT and every line goes the paged path (OutcomeApplier.apply), which
# demotes that one. (One index probe per line saved: ~0.1 s of backend CPU per 100k.)
_LINES = """
INSERT INTO bo_lines (line_id, bank_serial, account_no, amount_fen, paid_before_fen)
SELECT r.line_id, r.bank_serial, r.bank_account_no, r.bank_amount_fen,
       COALESCE(SUM(r.bank_amount_fen) OVER (PARTITION BY r.bank_account_no ORDER BY r.line_id
                                             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
FROM (
  SELECT q.*, MAX(q.irregular) OVER (PARTITION BY q.bank_account_no) AS account_irregular
  FROM (
    SELECT l.line_id, l.bank_serial, l.bank_account_no, l.bank_amount_fen,
           CASE WHEN c.account_no IS NULL OR c.status <> 'OPEN'
                  OR l.bank_account_no IN (SELECT u.mis_account_no FROM recon_lines u
                                           WHERE u.bank_id = :bank_id AND u.settlement_date = :day
                                             AND u.outcome = 'UTILITY_ONLY')
                THEN 1 ELSE 0 END AS irregular
    FROM recon_lines l LEFT JOIN customers c ON c.account_no = l.bank_account_no
    WHERE l.bank_id = :bank_id AND l.settlement_date = :day AND l.outcome = 'BANK_ONLY'
  ) q
) r
WHERE r.account_irregular = 0
"""

# Each line's share of each bill: the overlap of the line's interval with the bill's fee
# interval [b0, b0 + fee) and principal interval [b0 + fee, b0 + fee + principal).
_ALLOCS = """
INSERT INTO bo_allocs (line_id, bill_id, due_before_fen, late_fee_fen, principal_fen)
SELECT l.line_id, b.bill_id, b.due_before_fen,
       {greatest}(0, {least}(l.paid_before_fen + l.amount_fen, b.due_before_fen + b.fee_due_fen)
                     - {greatest}(l.paid_before_fen, b.due_before_fen)),
       {greatest}(0, {least}(l.paid_before_fen + l.amount_fen,
                             b.due_before_fen + b.fee_due_fen + b.principal_due_fen)
                     - {greatest}(l.paid_before_fen, b.due_before_fen + b.fee_due_fen))
FROM bo_lines l JOIN bo_bills b ON b.account_no = l.account_no
 AND b.due_before_fen < l.paid_before_fen + l.amount_fen
 AND b.due_before_fen + b.fee_due_fen + b.principal_due_fen > l.paid_before_fen
"""

# The payment rows: arrears and prepaid credit after each, in the account's line order.
_PAYS = """
INSERT INTO bo_pays (line_id, bank_serial, account_no, branch_code, amount_fen, arrears_after_fen,
                     prepaid_after_fen, prepaid_added_fen{id_col})
SELECT w.line_id, w.bank_serial, w.account_no, w.branch_code, w.amount_fen,
       w.principal_due_fen - SUM(w.principal_fen) OVER (PARTITION BY w.account_no ORDER BY w.line_id
                                                        ROWS UNBOUNDED PRECEDING),
       w.prepaid_fen + SUM(w.amount_fen - w.allocated_fen) OVER (PARTITION BY w.account_no ORDER BY w.line_id
                                                                 ROWS UNBOUNDED PRECEDING),
       w.amount_fen - w.allocated_fen{id_val}
FROM (
  SELECT l.line_id, l.bank_serial, l.account_no, c.branch_code, l.amount_fen, c.prepaid_fen,
         COALESCE(t.principal_due_fen, 0) AS principal_due_fen,
         COALESCE(a.principal_fen, 0) AS principal_fen, COALESCE(a.allocated_fen, 0) AS allocated_fen
  FROM bo_lines l JOIN customers c ON c.account_no = l.account_no
  LEFT JOIN (SELECT account_no, SUM(principal_due_fen) AS principal_due_fen FROM bo_bills GROUP BY account_no) t
         ON t.account_no = l.account_no
  LEFT JOIN (SELECT line_id, SUM(principal_fen) AS principal_fen, SUM(late_fee_fen + principal_fen) AS allocated_fen
             FROM bo_allocs GROUP BY line_id) a ON a.line_id = l.line_id
) w{order}
"""
# PostgreSQL: each payment's id drawn from the sequence here, in line order (a volatile
# output column is computed after the ORDER BY's sort), so that the payments go in by a
# plain INSERT: no RETURNING, no second pass writing the ids into bo_pays. The sequence is
# looked up once (an InitPlan returning the regclass): pg_get_serial_sequence's text, cast
# to regclass in each row, was a catalog lookup by name per payment (≈1.0 s of 1.4 s per
# 100k rows; 0.1 s without).
_PG_PAYS = _PAYS.format(id_col=", payment_id",
                        id_val=",\n       nextval((SELECT CAST(pg_get_serial_sequence('payments', 'payment_id') "
                               "AS regclass)))",
                        order="\nORDER BY w.line_id")
_PAYS = _PAYS.format(id_col="", id_val="", order="")

_CHECK = """
SELECT COUNT(*), COALESCE(SUM(p.amount_fen - p.prepaid_added_fen), 0),
       COALESCE(SUM(CASE WHEN p.prepaid_added_fen < 0 THEN 1 ELSE 0 END), 0)
FROM bo_pays p
"""
_ALLOCATED = "SELECT COALESCE(SUM(late_fee_fen + principal_fen), 0) FROM bo_allocs"

_INSERT_PAYMENTS = """
INSERT INTO payments (bank_id, bank_serial, state, account_no, branch_code, amount_fen, channel, outlet_code,
                      teller_id, bank_balance_fen, settlement_date, posted_at, arrears_after_fen, prepaid_after_fen,
                      prepaid_added_fen, reversed_at, reversed_on, cancel_serial)
SELECT :bank_id, p.bank_serial, 'POSTED', p.account_no, p.branch_code, p.amount_fen, :channel, '', '', NULL, :day,
       :now, p.arrears_after_fen, p.prepaid_after_fen, p.prepaid_added_fen, NULL, NULL, NULL
FROM bo_pays p ORDER BY p.line_id
"""
# PostgreSQL: with the ids drawn in bo_pays (_PG_PAYS).
_PG_INSERT_PAYMENTS = (_INSERT_PAYMENTS.replace("INSERT INTO payments (", "INSERT INTO payments (payment_id, ")
                       .replace("SELECT :bank_id, p.bank_serial", "SELECT p.payment_id, :bank_id, p.bank_serial"))
_PAYMENT_IDS = """
UPDATE bo_pays SET payment_id = (SELECT p.payment_id FROM payments p
                                 WHERE p.bank_id = :bank_id AND p.bank_serial = bo_pays.bank_serial)
"""
_INSERT_ALLOCATIONS = """
INSERT INTO allocations (payment_id, bill_id, late_fee_fen, principal_fen)
SELECT p.payment_id, a.bill_id, a.late_fee_fen, a.principal_fen
FROM bo_allocs a JOIN bo_pays p ON p.line_id = a.line_id
WHERE a.late_fee_fen + a.principal_fen > 0
ORDER BY a.line_id, a.due_before_fen
"""
# What each touched bill becomes (new values only, so the UPDATE's assignment order never matters),
# in bill_id order: the bills are visited along the table, not at random (a random visit of a
# table larger than the buffer cache evicts dirty pages, each waiting for its WAL flush).
_BILL_VALUES = """
SELECT v.bill_id, v.principal_paid_fen, v.late_fee_paid_fen, v.micro, v.accrual_date,
       CASE WHEN v.prepaid_applied_fen + v.principal_paid_fen >= v.amount_fen THEN 'PAID'
            WHEN v.principal_paid_fen <> 0 OR v.late_fee_paid_fen <> 0 OR v.prepaid_applied_fen <> 0 THEN 'PARTIAL'
            ELSE 'UNPAID' END AS status,
       CASE WHEN v.prepaid_applied_fen + v.principal_paid_fen >= v.amount_fen THEN :day END AS paid_on
FROM (
  SELECT b.bill_id, b.amount_fen, b.prepaid_applied_fen, b.principal_paid_fen + a.principal_fen AS principal_paid_fen,
         b.late_fee_paid_fen + a.late_fee_fen AS late_fee_paid_fen, b.micro,
         CASE WHEN b.accrual_date > :day THEN b.accrual_date ELSE :day END AS accrual_date
  FROM bo_bills b JOIN (SELECT bill_id, SUM(principal_fen) AS principal_fen, SUM(late_fee_fen) AS late_fee_fen
                        FROM bo_allocs WHERE late_fee_fen + principal_fen > 0 GROUP BY bill_id) a
    ON a.bill_id = b.bill_id
) v
ORDER BY v.bill_id
"""
_BILL_SET = (("principal_paid_fen", "principal_paid_fen"), ("late_fee_paid_fen", "late_fee_paid_fen"),
             ("accrual_micro", "micro"), ("accrual_date", "accrual_date"), ("status", "status"),
             ("paid_on", "paid_on"))


def _bill_set(target: str) -> str:
    return ", ".join(f"{target}{col} = v.{val}" for col, val in _BILL_SET)


_UPDATE_BILLS = f"UPDATE bills SET {_bill_set('')} FROM ({_BILL_VALUES}) v WHERE bills.bill_id = v.bill_id"
_MYSQL_UPDATE_BILLS = f"UPDATE bills JOIN ({_BILL_VALUES}) v ON bills.bill_id = v.bill_id SET {_bill_set('bills.')}"
_PREPAID_ADDED = ("SELECT account_no, SUM(prepaid_added_fen) AS added_fen FROM bo_pays GROUP BY account_no "
                  "HAVING SUM(prepaid_added_fen) > 0")
_UPDATE_PREPAID = (f"UPDATE customers SET prepaid_fen = customers.prepaid_fen + v.added_fen FROM ({_PREPAID_ADDED}) v "
                   "WHERE customers.account_no = v.account_no")
_MYSQL_UPDATE_PREPAID = (f"UPDATE customers JOIN ({_PREPAID_ADDED}) v ON customers.account_no = v.account_no "
                         "SET customers.prepaid_fen = customers.prepaid_fen + v.added_fen")
_INSERT_LEDGER = """
INSERT INTO prepaid_ledger (account_no, reason, delta_fen, balance_after_fen, payment_id, bill_id, at)
SELECT p.account_no, 'PAYMENT', p.prepaid_added_fen, p.prepaid_after_fen, p.payment_id, NULL, :now
FROM bo_pays p WHERE p.prepaid_added_fen > 0 ORDER BY p.line_id
"""
_INSERT_JOURNAL = """
INSERT INTO journal (at, bank_id, rpc, serial, original_serial, account_no, amount_fen, outcome, payment_id)
SELECT :now, :bank_id, 'RECONCILE', p.bank_serial, '', p.account_no, p.amount_fen, 'BANK_ONLY_POSTED', p.payment_id
FROM bo_pays p ORDER BY p.line_id
"""
_FAST_ACCOUNTS: sa.Select[Any] = sa.select(sa.column("account_no")).select_from(sa.table(FAST_LINES))
_LOCK = (sa.select(T_CUST.c.account_no)
         .where(T_CUST.c.account_no.in_(_FAST_ACCOUNTS))
         .order_by(T_CUST.c.account_no).with_for_update())


def _text(sql: str) -> sa.TextClause:
    clause = sa.text(sql)
    binds = [sa.bindparam(name, type_=t) for name, t in (("day", sa.Date()), ("now", INSTANT)) if f":{name}" in sql]
    return clause.bindparams(*binds) if binds else clause


def _bills_select(rates: LateFeeRates) -> sa.Select:  # type: ignore[type-arg]
    """The fast accounts' unpaid bills: micro and dues as of the day, and what is due before
    each on its account (oldest first, as allocate_payment orders them)."""
    b, c = T_BILL, T_CUST
    principal_unpaid = b.c.amount_fen - b.c.prepaid_applied_fen - b.c.principal_paid_fen
    micro = accrual_micro_sql(principal_unpaid=principal_unpaid, accrual_micro=b.c.accrual_micro,
                              accrual_date=b.c.accrual_date, tariff_class=c.c.tariff_class, period=b.c.period,
                              as_of=sa.bindparam("day", type_=sa.Date()), rates=rates)
    inner = (sa.select(b.c.bill_id, b.c.account_no, b.c.period, b.c.amount_fen, b.c.prepaid_applied_fen,
                       b.c.principal_paid_fen, b.c.late_fee_paid_fen, b.c.accrual_date, micro.label("micro"),
                       principal_unpaid.label("principal_due_fen"))
             .join(c, c.c.account_no == b.c.account_no)
             .where(b.c.account_no.in_(_FAST_ACCOUNTS), b.c.status != "PAID")
             .subquery("u"))
    fee_due = fee_due_from_micro_sql(inner.c.micro, inner.c.late_fee_paid_fen, rates).label("fee_due_fen")
    mid = sa.select(*[col for col in inner.c if col.name != "period"], fee_due, inner.c.period).subquery("d")
    due_before = sa.func.coalesce(sa.func.sum(mid.c.fee_due_fen + mid.c.principal_due_fen).over(
        partition_by=mid.c.account_no, order_by=(mid.c.period, mid.c.bill_id), rows=(None, -1)), 0)
    return sa.select(mid.c.bill_id, mid.c.account_no, mid.c.amount_fen, mid.c.prepaid_applied_fen,
                     mid.c.principal_paid_fen, mid.c.late_fee_paid_fen, mid.c.accrual_date, mid.c.micro,
                     mid.c.fee_due_fen, mid.c.principal_due_fen, due_before.label("due_before_fen"))


# bo_bills as a Table for INSERT ... SELECT (the table itself is created by _CREATE)
_BO_BILLS = sa.Table("bo_bills", sa.MetaData(), *(sa.Column(name) for name in (
    "bill_id", "account_no", "amount_fen", "prepaid_applied_fen", "principal_paid_fen", "late_fee_paid_fen",
    "accrual_date", "micro", "fee_due_fen", "principal_due_fen", "due_before_fen")))


def drop_work_tables(conn: Connection) -> None:
    """Drops the work tables, temporary ones only: on MariaDB a plain DROP TABLE would
    commit the day-closing transaction half way (an implicit commit)."""
    dialect = conn.dialect.name
    for name in _WORK_TABLES:
        if dialect in ("mysql", "mariadb"):
            conn.exec_driver_sql(f"DROP TEMPORARY TABLE IF EXISTS {name}")
        else:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {'pg_temp' if dialect == 'postgresql' else 'temp'}.{name}")


def create_work_tables(conn: Connection) -> None:
    drop_work_tables(conn)
    for ddl in _CREATE:
        conn.exec_driver_sql(ddl)


def forget_fast_lines(conn: Connection) -> None:
    """After a rollback to before post_common_bank_only: no line was posted this way."""
    conn.exec_driver_sql(f"DELETE FROM {FAST_LINES}")


def post_common_bank_only(conn: Connection, *, bank_id: str, day: dt.date, rates: LateFeeRates,
                          now: dt.datetime, channel: str) -> int:
    """Posts the day's regular BANK_ONLY lines; returns how many. The work tables must exist
    (create_work_tables); the lines posted stay listed in FAST_LINES until drop_work_tables
    (the caller skips them, then drops it)."""
    dialect = conn.dialect.name
    mysql = dialect in ("mysql", "mariadb")
    key = {"bank_id": bank_id, "day": day}
    n = conn.execute(_text(_LINES), key).rowcount
    if not n:
        return 0
    _analyze(conn, "bo_lines")
    conn.execute(_LOCK).all()  # the accounts' rows, in account order: another bank's Pay waits
    conn.execute(sa.insert(_BO_BILLS).from_select(list(_BO_BILLS.c), _bills_select(rates)), key)
    _analyze(conn, "bo_bills")
    least, greatest = ("min", "max") if dialect == "sqlite" else ("LEAST", "GREATEST")
    conn.execute(_text(_ALLOCS.format(least=least, greatest=greatest)))
    conn.execute(_text(_PG_PAYS if dialect == "postgresql" else _PAYS))
    _check(conn)
    at = {"bank_id": bank_id, "day": day, "now": now, "channel": channel}
    if dialect == "postgresql":
        conn.execute(_text(_PG_INSERT_PAYMENTS), at)
    else:
        conn.execute(_text(_INSERT_PAYMENTS), at)
        conn.execute(_text(_PAYMENT_IDS), at)
    # the bills before their allocations: each allocation's foreign-key check then finds its bill
    # already locked by this transaction's update, on a page just visited in bill order
    conn.execute(_text(_MYSQL_UPDATE_BILLS if mysql else _UPDATE_BILLS), key)
    conn.execute(_text(_INSERT_ALLOCATIONS))
    conn.execute(_text(_MYSQL_UPDATE_PREPAID if mysql else _UPDATE_PREPAID))
    conn.execute(_text(_INSERT_LEDGER), at)
    conn.execute(_text(_INSERT_JOURNAL), at)
    return int(n)


def _analyze(conn: Connection, table: str) -> None:
    """PostgreSQL plans a temporary table blind (autovacuum never sees one): statistics first."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"ANALYZE {table}")


def _check(conn: Connection) -> None:
    """Allocations plus prepaid credit add up to the payments, none negative: checked before writing."""
    n, paid_to_bills, negative = conn.execute(sa.text(_CHECK)).one()
    allocated = conn.execute(sa.text(_ALLOCATED)).scalar_one()
    if int(paid_to_bills) != int(allocated) or int(negative):
        raise AllocationInvariantBroken(f"BANK_ONLY allocations {allocated} != payments less prepaid {paid_to_bills} "
                           f"over {n} lines ({negative} with negative prepaid)")
