"""Reconciliation tables (closed days, stored results, staging).
Owned by the reconciliation work; see mis_adapter/recon*.

- `reconciled_days`: one row per (bank, settlement date) reconciled: the day
  is closed to cancels, and `summary_json` is the stored result that a second
  reconciliation of the day returns.
- `recon_lines`: the stored discrepancy lines of a reconciled day (every
  outcome but MATCHED), replayed in `line_id` order.
- `recon_staging` is not a schema table: it is a TEMPORARY table created per
  reconciliation on its own connection (bulk-loaded, joined, then dropped
  with the connection), so it never reaches the write-ahead log and two
  reconciliations never see each other's records."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from mis_adapter.db.base import Base, BigId, Money


class ReconciledDay(Base):
    """A bank's settlement day that has been reconciled: closed to cancels.
    `summary_json` is the stored result a second reconciliation returns."""
    __tablename__ = "reconciled_days"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    settlement_date: Mapped[dt.date] = mapped_column(sa.Date, primary_key=True)
    reconciled_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    summary_json: Mapped[str] = mapped_column(sa.Text, default="")


class ReconLine(Base):
    """One discrepancy found (and, for BANK_ONLY / UTILITY_ONLY, acted on) when
    a bank's day was reconciled. Never updated after the day closes."""
    __tablename__ = "recon_lines"
    __table_args__ = (sa.Index("ix_recon_lines_day", "bank_id", "settlement_date", "line_id"),)
    line_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[str] = mapped_column(sa.String(16))
    settlement_date: Mapped[dt.date] = mapped_column(sa.Date)
    bank_serial: Mapped[str] = mapped_column(sa.String(32))
    # BANK_ONLY, UTILITY_ONLY, MISMATCH
    outcome: Mapped[str] = mapped_column(sa.String(12))
    # the bank record's line number in its stream or file (0: the bank did not send it)
    bank_line_no: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    bank_account_no: Mapped[str] = mapped_column(sa.String(10), default="")
    mis_account_no: Mapped[str] = mapped_column(sa.String(10), default="")
    bank_amount_fen: Mapped[int] = mapped_column(Money, default=0)
    mis_amount_fen: Mapped[int] = mapped_column(Money, default=0)
    # POSTED, CANCELLED or "" (not in the bank's records)
    bank_status: Mapped[str] = mapped_column(sa.String(10), default="")
    # POSTED, REVERSED, TOMBSTONE or "" (not in the MIS), as found before the outcome was applied
    mis_state: Mapped[str] = mapped_column(sa.String(10), default="")
    detail: Mapped[str] = mapped_column(sa.String(128), default="")


# The per-reconciliation staging table: TEMPORARY, on its own metadata so that
# neither Alembic nor create_all ever makes it a schema table.
staging_metadata = sa.MetaData()
recon_staging = sa.Table(
    "recon_staging", staging_metadata,
    # Unbounded text: whatever the bank sent is loaded, then the field rules are
    # checked set-based, naming the first bad record (mis_adapter/recon_staging.py).
    sa.Column("line_no", sa.BigInteger, nullable=False),
    sa.Column("bank_serial", sa.Text, nullable=False),
    sa.Column("account_no", sa.Text, nullable=False),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    # POSTED or CANCELLED
    sa.Column("status", sa.Text, nullable=False),
    prefixes=["TEMPORARY"],
)
