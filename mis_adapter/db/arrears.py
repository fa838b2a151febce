"""Arrears snapshots (mis_adapter/arrears_snapshot.py): the bills in arrears at the end of a
closed day S, copied as their rows stood, so that an arrears report for a date D >= S reads
them instead of every bill (reports._arrears_bills). Written only by the snapshot job; read
by the reports; removed by the job's retention rule.

- `arrears_snapshots`: one row per snapshot day. `state` BUILDING while the job writes it,
  READY once complete. `bills_upto`: every bill with a larger id is not in it (the report
  reads those from `bills`). `reconciled_count`: the reconciled (bank, day) rows dated on or
  before the day when it was taken; a later reconciliation of such a day (the only write
  dated on or before a closed day that can come later) makes the counts differ, and a report
  then ignores the snapshot.
- `arrears_snapshot_bills`: per snapshot day, the bills in arrears at its end that no payment
  settled or reversed after it had touched when it was taken: the columns the late-fee rule
  reads, as the bill row held them (the report prices them with the customer's current tariff,
  as the reconstruction does)."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from mis_adapter.db.base import Base, Money

BUILDING, READY = "BUILDING", "READY"


class ArrearsSnapshot(Base):
    __tablename__ = "arrears_snapshots"
    as_of: Mapped[dt.date] = mapped_column(sa.Date, primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(8))
    bills_upto: Mapped[int] = mapped_column(sa.BigInteger)
    reconciled_count: Mapped[int] = mapped_column(sa.BigInteger)
    bills: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    started_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))


class ArrearsSnapshotBill(Base):
    __tablename__ = "arrears_snapshot_bills"
    as_of: Mapped[dt.date] = mapped_column(sa.Date, primary_key=True)
    bill_id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    account_no: Mapped[str] = mapped_column(sa.String(10))
    period: Mapped[str] = mapped_column(sa.String(6))
    unpaid_fen: Mapped[int] = mapped_column(Money)
    accrual_micro: Mapped[int] = mapped_column(sa.BigInteger)
    accrual_date: Mapped[dt.date] = mapped_column(sa.Date)
    late_fee_paid_fen: Mapped[int] = mapped_column(Money)
