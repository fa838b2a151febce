"""Core MIS tables: branches, banks, customers (accounts), meters and
readings, bills, payments and their allocations, the prepaid ledger,
cancels (with tombstones), auto-debit agreements and the append-only
request journal."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column

from mis_adapter.db.base import Base, BigId, Money

TZ = sa.DateTime(timezone=True)
# Instants of money movements: microseconds on MariaDB too (revision 0004_time_precision).
INSTANT = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


class Branch(Base):
    __tablename__ = "branches"
    code: Mapped[str] = mapped_column(sa.String(2), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64))


class Bank(Base):
    __tablename__ = "banks"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    # 停工: while suspended, money-moving requests get UNAVAILABLE.
    suspended: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    suspended_reason: Mapped[str] = mapped_column(sa.String(128), default="")
    updated_at: Mapped[dt.datetime | None] = mapped_column(TZ, nullable=True)


class BankDayLock(Base):
    """The row MariaDB's bank-day lock (banks.lock_bank_day) takes shared or exclusive, one per bank and
    database. Made on first use in each database (a branch database holds no `banks` rows, and a lock
    on a missing row locks nothing); it says nothing about the bank: `banks` is who exists."""
    __tablename__ = "bank_day_locks"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)


class Customer(Base):
    """One electricity account (户号) and its holder."""
    __tablename__ = "customers"
    # fillfactor 90 (0004_pgpay_lean_pay): a pay's prepaid credit updates the row HOT on PostgreSQL
    __table_args__ = {"postgresql_with": {"fillfactor": 90}}
    account_no: Mapped[str] = mapped_column(sa.String(10), primary_key=True)
    branch_code: Mapped[str] = mapped_column(sa.String(2), sa.ForeignKey("branches.code"), index=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    address: Mapped[str] = mapped_column(sa.String(128))
    phone: Mapped[str] = mapped_column(sa.String(20))
    # RESIDENTIAL, COMMERCIAL, INDUSTRIAL (the last two are "other customers" for late fees)
    tariff_class: Mapped[str] = mapped_column(sa.String(16))
    # OPEN or CLOSED
    status: Mapped[str] = mapped_column(sa.String(8), default="OPEN")
    prepaid_fen: Mapped[int] = mapped_column(Money, default=0)
    opened_on: Mapped[dt.date] = mapped_column(sa.Date)


class Meter(Base):
    __tablename__ = "meters"
    meter_no: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    account_no: Mapped[str] = mapped_column(sa.String(10), sa.ForeignKey("customers.account_no"), index=True)
    installed_on: Mapped[dt.date] = mapped_column(sa.Date)


class Reading(Base):
    __tablename__ = "readings"
    # fillfactor 50 (0004_readings_hot): issuing marks each reading billed once, HOT on PostgreSQL.
    __table_args__ = (sa.UniqueConstraint("meter_no", "period"), {"postgresql_with": {"fillfactor": 50}})
    reading_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    meter_no: Mapped[str] = mapped_column(sa.String(16), sa.ForeignKey("meters.meter_no"))
    account_no: Mapped[str] = mapped_column(sa.String(10), index=True)
    period: Mapped[str] = mapped_column(sa.String(6))
    # cumulative register value and this period's consumption
    register_kwh: Mapped[int] = mapped_column(sa.BigInteger)
    kwh: Mapped[int] = mapped_column(sa.BigInteger)
    read_on: Mapped[dt.date] = mapped_column(sa.Date)
    billed: Mapped[bool] = mapped_column(sa.Boolean, default=False)


class BillRow(Base):
    """A bill and how much of it is settled. Late fees accrue on the unpaid
    principal; `accrual_micro` holds the exact accrued fee in millionths of
    a fen up to `accrual_date`, so partial payments never round twice."""
    __tablename__ = "bills"
    # No index on status, paid_on or accrual_date (0004_bills_indexes, 0004_bills_hot): a payment changes
    # all three on every bill it settles, and with none of them indexed and room on the page (fillfactor)
    # PostgreSQL updates the bill HOT, writing no index entry; fillfactor 50 (0004_bills_feed_hot) leaves room
    # for every bill's settling version, as the feed settles a whole batch's bills in one UPDATE. The arrears
    # reports and the metrics read the unpaid bills in one scan; every other reader of unpaid bills names the account.
    __table_args__ = (sa.UniqueConstraint("account_no", "period"),
                      {"postgresql_with": {"fillfactor": 50}})
    bill_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_no: Mapped[str] = mapped_column(sa.String(10), sa.ForeignKey("customers.account_no"))
    period: Mapped[str] = mapped_column(sa.String(6))
    kwh: Mapped[int] = mapped_column(sa.BigInteger)
    amount_fen: Mapped[int] = mapped_column(Money)
    # prepaid credit applied when the bill was issued (counts as principal paid)
    prepaid_applied_fen: Mapped[int] = mapped_column(Money, default=0)
    principal_paid_fen: Mapped[int] = mapped_column(Money, default=0)
    late_fee_paid_fen: Mapped[int] = mapped_column(Money, default=0)
    accrual_micro: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    accrual_date: Mapped[dt.date] = mapped_column(sa.Date)
    due_date: Mapped[dt.date] = mapped_column(sa.Date)
    issued_at: Mapped[dt.datetime] = mapped_column(TZ)
    # UNPAID, PARTIAL, PAID
    status: Mapped[str] = mapped_column(sa.String(8), default="UNPAID")
    paid_on: Mapped[dt.date | None] = mapped_column(sa.Date, nullable=True)
    # set when an auto-debit failed for lack of funds: the bill awaits dunning
    dunning: Mapped[bool] = mapped_column(sa.Boolean, default=False)


class Payment(Base):
    """A payment, or a tombstone (state TOMBSTONE) left by a cancel that
    overtook its payment. (bank_id, bank_serial) is unique: the idempotency key."""
    __tablename__ = "payments"
    __table_args__ = (sa.UniqueConstraint("bank_id", "bank_serial"),
                      # one index for the day and the bank (0004_payments_day_bank): no other index
                      # led by bank_id, so the serial look-up's generic plan is the unique key
                      sa.Index("ix_payments_day_bank", "settlement_date", "bank_id"),
                      # reports: the payments reversed after an as-of date (migration 0004_bulk); only
                      # reversed rows are indexed where the database can (0004_partial_reversed_on): a
                      # pay writes one index entry less
                      sa.Index("ix_payments_reversed_on", "reversed_on",
                               postgresql_where=sa.text("reversed_on IS NOT NULL"),
                               sqlite_where=sa.text("reversed_on IS NOT NULL")))
    payment_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[str] = mapped_column(sa.String(16))
    bank_serial: Mapped[str] = mapped_column(sa.String(32))
    # POSTED, REVERSED, TOMBSTONE
    state: Mapped[str] = mapped_column(sa.String(10))
    account_no: Mapped[str | None] = mapped_column(sa.String(10), nullable=True, index=True)
    branch_code: Mapped[str] = mapped_column(sa.String(2), default="")
    amount_fen: Mapped[int] = mapped_column(Money)
    channel: Mapped[str] = mapped_column(sa.String(12), default="")
    outlet_code: Mapped[str] = mapped_column(sa.String(16), default="")
    teller_id: Mapped[str] = mapped_column(sa.String(16), default="")
    bank_balance_fen: Mapped[int | None] = mapped_column(Money, nullable=True)
    settlement_date: Mapped[dt.date] = mapped_column(sa.Date)
    posted_at: Mapped[dt.datetime] = mapped_column(INSTANT)
    arrears_after_fen: Mapped[int] = mapped_column(Money, default=0)
    prepaid_after_fen: Mapped[int] = mapped_column(Money, default=0)
    # the part of the amount that became prepaid credit
    prepaid_added_fen: Mapped[int] = mapped_column(Money, default=0)
    reversed_at: Mapped[dt.datetime | None] = mapped_column(INSTANT, nullable=True)
    reversed_on: Mapped[dt.date | None] = mapped_column(sa.Date, nullable=True)
    cancel_serial: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)


class AllocationRow(Base):
    __tablename__ = "allocations"
    allocation_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    payment_id: Mapped[int] = mapped_column(sa.BigInteger, sa.ForeignKey("payments.payment_id"), index=True)
    bill_id: Mapped[int] = mapped_column(sa.BigInteger, sa.ForeignKey("bills.bill_id"), index=True)
    late_fee_fen: Mapped[int] = mapped_column(Money)
    principal_fen: Mapped[int] = mapped_column(Money)


class PrepaidEntry(Base):
    """Every change of an account's prepaid credit (预存), with its cause."""
    __tablename__ = "prepaid_ledger"
    entry_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # not indexed (0004_pgpay_lean_pay): nothing reads the ledger by account
    account_no: Mapped[str] = mapped_column(sa.String(10))
    # PAYMENT, REVERSAL, BILL_APPLIED, DEBIT_SURPLUS
    reason: Mapped[str] = mapped_column(sa.String(16))
    delta_fen: Mapped[int] = mapped_column(Money)
    balance_after_fen: Mapped[int] = mapped_column(Money)
    payment_id: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    bill_id: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    at: Mapped[dt.datetime] = mapped_column(INSTANT)


class CancelRow(Base):
    __tablename__ = "cancels"
    __table_args__ = (sa.UniqueConstraint("bank_id", "cancel_serial"),
                      sa.Index("ix_cancels_original", "bank_id", "original_serial"))
    cancel_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[str] = mapped_column(sa.String(16))
    cancel_serial: Mapped[str] = mapped_column(sa.String(32))
    original_serial: Mapped[str] = mapped_column(sa.String(32))
    amount_fen: Mapped[int] = mapped_column(Money)
    reason: Mapped[str] = mapped_column(sa.String(128), default="")
    # REVERSED or ORIGINAL_NOT_FOUND
    outcome: Mapped[str] = mapped_column(sa.String(20))
    settlement_date: Mapped[dt.date] = mapped_column(sa.Date)
    payment_id: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(INSTANT)


class Agreement(Base):
    """An auto-debit agreement (代扣协议): the account's bills are fed to this bank."""
    __tablename__ = "agreements"
    account_no: Mapped[str] = mapped_column(sa.String(10), sa.ForeignKey("customers.account_no"),
                                            primary_key=True)
    bank_id: Mapped[str] = mapped_column(sa.String(16), index=True)
    # the date from which the account's bills are fed (the agreement's start date)
    signed_on: Mapped[dt.date] = mapped_column(sa.Date)
    active: Mapped[bool] = mapped_column(sa.Boolean, default=True)
    # (revision 0004) the agreement_records row this is the index of, and its per-debit limit (NULL: none)
    agreement_id: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    debit_limit_fen: Mapped[int | None] = mapped_column(Money, nullable=True)


class JournalEntry(Base):
    """Append-only: every money-moving request that changed or confirmed state.
    Nothing updates or deletes these rows."""
    __tablename__ = "journal"
    # no index but the key: nothing reads the journal by bank or time (0004_journal_no_bank_at)
    entry_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(INSTANT)
    bank_id: Mapped[str] = mapped_column(sa.String(16))
    # PAY, CANCEL, DEBIT, RECONCILE
    rpc: Mapped[str] = mapped_column(sa.String(12))
    serial: Mapped[str] = mapped_column(sa.String(32))
    original_serial: Mapped[str] = mapped_column(sa.String(32), default="")
    account_no: Mapped[str] = mapped_column(sa.String(10), default="")
    amount_fen: Mapped[int] = mapped_column(Money, default=0)
    outcome: Mapped[str] = mapped_column(sa.String(24))
    payment_id: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
