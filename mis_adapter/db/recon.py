"""Reconciliation tables (closed days, stored results, staging).
Owned by the reconciliation work; see mis_adapter/recon*."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from mis_adapter.db.base import Base


class ReconciledDay(Base):
    """A bank's settlement day that has been reconciled: closed to cancels.
    `summary_json` is the stored result a second reconciliation returns."""
    __tablename__ = "reconciled_days"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    settlement_date: Mapped[dt.date] = mapped_column(sa.Date, primary_key=True)
    reconciled_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    summary_json: Mapped[str] = mapped_column(sa.Text, default="")
