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
  `format` (SNAPSHOT_FORMAT, 0004_reportsx_snapshot_format): what the rows are; `rates`: the
  late-fee rates their accruals were computed with (a report with other rates ignores it).
- `arrears_snapshot_bills`: per snapshot day, every bill in arrears at its end (of those with an
  id up to bills_upto), as it stood then, reconstructed from history: unpaid principal, the fee
  accrued through the day (`accrual_micro`, from which the accrual continues at `accrual_date`,
  the later of the day and the due date) and the fee paid by then. `replay_ok`: the bill had no
  allocation of a payment settled on or before the day and its accrual then is the one a replay from its
  issue gives (arrears_snapshot._insert_rows); a report replays a bill that is not, once a payment
  after the day touches it."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from mis_adapter.db.base import Base, Money

BUILDING, READY = "BUILDING", "READY"
SNAPSHOT_FORMAT = 2  # 1: the rows of the bills untouched since the day, copied (before 0004_reportsx_snapshot_format)


class ArrearsSnapshot(Base):
    __tablename__ = "arrears_snapshots"
    as_of: Mapped[dt.date] = mapped_column(sa.Date, primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(8))
    bills_upto: Mapped[int] = mapped_column(sa.BigInteger)
    reconciled_count: Mapped[int] = mapped_column(sa.BigInteger)
    bills: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    started_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    format: Mapped[int] = mapped_column(sa.SmallInteger, server_default="1")
    rates: Mapped[str] = mapped_column(sa.String(80), server_default="")


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
    replay_ok: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
