"""Voice dunning tables (自动语音催费), owned by the customer-channels work;
see mis_adapter/customers.py and customer_service.py. They live in the
account's branch database, next to its bills.

- `dunning_attempts`: one row per (campaign, account, attempt number), the
  idempotency key of RecordDunningAttempt. A PLACED row may be completed once
  with its final outcome; nothing else updates it and nothing deletes it.
- `dunning_opt_outs`: the households that asked not to be called, with who
  changed the flag, when and why (the row stays when the flag is cleared)."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from mis_adapter.db.base import Base, BigId

TZ = sa.DateTime(timezone=True)


class DunningAttemptRow(Base):
    __tablename__ = "dunning_attempts"
    __table_args__ = (sa.UniqueConstraint("campaign_id", "account_no", "attempt_no"),
                      sa.Index("ix_dunning_attempts_account_at", "account_no", "placed_at"))
    attempt_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(sa.String(32))
    account_no: Mapped[str] = mapped_column(sa.String(10))
    attempt_no: Mapped[int] = mapped_column(sa.Integer)
    # PLACED, ANSWERED, NO_ANSWER, BUSY, FAILED, SKIPPED_PAID, SKIPPED_OPT_OUT
    outcome: Mapped[str] = mapped_column(sa.String(16))
    placed_at: Mapped[dt.datetime] = mapped_column(TZ)
    outcome_at: Mapped[dt.datetime] = mapped_column(TZ)
    detail: Mapped[str] = mapped_column(sa.String(128), default="")
    # the operator identity that recorded it, and the server's time of the last write
    operator: Mapped[str] = mapped_column(sa.String(64))
    recorded_at: Mapped[dt.datetime] = mapped_column(TZ)


class DunningOptOut(Base):
    __tablename__ = "dunning_opt_outs"
    account_no: Mapped[str] = mapped_column(sa.String(10), primary_key=True)
    opted_out: Mapped[bool] = mapped_column(sa.Boolean)
    reason: Mapped[str] = mapped_column(sa.String(128), default="")
    operator: Mapped[str] = mapped_column(sa.String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(TZ)
