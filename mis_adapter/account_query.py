"""QueryAccount: an account's customer row and its unpaid bills, read in ONE
statement (a LEFT JOIN; no row at all = unknown account) outside any
explicit transaction, so the answer is one consistent snapshot on every
back end without BEGIN, COMMIT or ROLLBACK around it.

Why not payments.py's two statements in a read-only transaction: at 500
queries/s through the bridge on SQLite that cost ≈350–450 µs of mis_adapter
CPU per query (pool checkout, the SQLite BEGIN listener, two executions and
their result machinery, ROLLBACK), against ≈55–70 µs for this statement on
the pooled driver connection.
- SQLite: the compiled statement runs on the pooled sqlite3 connection
  itself (transaction control is ours, `isolation_level=None`, so a lone
  SELECT is its own read transaction); DATE columns arrive as ISO text.
- PostgreSQL: through SQLAlchemy in autocommit: no transaction, so none ends
  in ROLLBACK on the pays' pool (psycopg forgets every statement it prepared
  on a connection at a ROLLBACK, sending the next pays on it back to parsing
  and planning); an unknown account ended that way before.
- MariaDB: through SQLAlchemy; the pool's reset ends the implicit transaction
  as before.
The selection and order of bills are payments.py's (`status != 'PAID'`,
by period then bill id) and the figures come from the one rule
(allocation.bills_due)."""
from __future__ import annotations

import datetime as dt
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter.allocation import bills_due
from mis_adapter.db.base import table_of
from mis_adapter.db.core import BillRow, Customer
from mis_adapter.payments import AccountView, BillView, Books
from yindian_common.clock import business_date
from yindian_common.db_errors import db_call
from yindian_common.errors import AccountNotFound
from yindian_common.fields import mask_name

T_CUST = table_of(Customer)
T_BILL = table_of(BillRow)

# The customer's columns, then the bill's (NULL when the account has no unpaid bill).
_CUSTOMER_COLUMNS = 5
_QUERY = (sa.select(T_CUST.c.branch_code, T_CUST.c.tariff_class, T_CUST.c.status.label("customer_status"),
                    T_CUST.c.prepaid_fen, T_CUST.c.name,
                    T_BILL.c.bill_id, T_BILL.c.period, T_BILL.c.kwh, T_BILL.c.amount_fen,
                    T_BILL.c.prepaid_applied_fen, T_BILL.c.principal_paid_fen, T_BILL.c.late_fee_paid_fen,
                    T_BILL.c.accrual_micro, T_BILL.c.accrual_date, T_BILL.c.due_date, T_BILL.c.status)
          .select_from(T_CUST.outerjoin(T_BILL, sa.and_(T_BILL.c.account_no == T_CUST.c.account_no,
                                                        T_BILL.c.status != sa.literal_column("'PAID'"))))
          .where(T_CUST.c.account_no == sa.bindparam("account_no"))
          .order_by(T_BILL.c.period, T_BILL.c.bill_id))


class _Bill(NamedTuple):
    """An unpaid bill as allocation.bills_due reads it."""
    bill_id: int
    period: str
    kwh: int
    amount_fen: int
    prepaid_applied_fen: int
    principal_paid_fen: int
    late_fee_paid_fen: int
    accrual_micro: int
    accrual_date: dt.date
    due_date: dt.date
    status: str


# The statement compiled for SQLite's driver, once (no SQLAlchemy execution per query there).
_SQLITE_SQL: str | None = None


def _sqlite_sql(engine: Engine) -> str:
    global _SQLITE_SQL
    if _SQLITE_SQL is None:
        _SQLITE_SQL = str(_QUERY.compile(dialect=engine.dialect))
    return _SQLITE_SQL


def _date(value: Any) -> Any:
    return dt.date.fromisoformat(value) if isinstance(value, str) else value


def _rows_sqlite(engine: Engine, account_no: str) -> list[Any]:
    sql = _sqlite_sql(engine)
    dbapi = engine.dialect.loaded_dbapi
    conn = engine.raw_connection()  # pool errors are SQLAlchemy's (PoolTimeout, OperationalError): translated
    try:
        cur = conn.cursor()
        try:
            cur.execute(sql, (account_no,))
            rows = cur.fetchall()
        except dbapi.Error as exc:
            # The same wrapping SQLAlchemy's own execution gives it (OperationalError: UNAVAILABLE).
            if engine.dialect.is_disconnect(exc, conn, cur):
                conn.invalidate(exc)
            raise sa.exc.DBAPIError.instance(sql, (account_no,), exc, dbapi.Error) from exc
        finally:
            cur.close()
    finally:
        conn.close()
    return [(*r[:_CUSTOMER_COLUMNS], *r[_CUSTOMER_COLUMNS:13], _date(r[13]), _date(r[14]), r[15]) for r in rows]


def _rows_sqlalchemy(engine: Engine, account_no: str) -> list[Any]:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT")
        return list(conn.execute(_QUERY, {"account_no": account_no}).all())


def query_account(ctx: Books, account_no: str) -> AccountView:
    return db_call(_query_account, ctx, account_no)


def _query_account(ctx: Books, account_no: str) -> AccountView:
    day = business_date(ctx.clock)
    engine = ctx.router.engine_for(account_no)
    read = _rows_sqlite if engine.dialect.name == "sqlite" else _rows_sqlalchemy
    rows = read(engine, account_no)
    if not rows:
        raise AccountNotFound(f"account {account_no} not found")
    branch_code, tariff_class, customer_status, prepaid_fen, name = rows[0][:_CUSTOMER_COLUMNS]
    bills = [_Bill(*r[_CUSTOMER_COLUMNS:]) for r in rows if r[_CUSTOMER_COLUMNS] is not None]
    due = bills_due(bills, tariff_class, day, ctx.rates)
    views = tuple(BillView(r.bill_id, r.period, r.kwh, r.amount_fen, d.principal_due_fen, d.late_fee_due_fen,
                           r.due_date, r.status) for r, d, _ in due)
    return AccountView(account_no, mask_name(name), branch_code,
                       sum(v.principal_due_fen for v in views), sum(v.late_fee_fen for v in views),
                       prepaid_fen, views[: ctx.settings.query_bills_max], day, customer_status != "OPEN")
