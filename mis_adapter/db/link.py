"""Tables of the link's other transactions (issue 15): auto-debit agreements
signed and ended over the link, feed notices withdrawn when an agreement
ends, refunds offered to the bank, and each bank's link state (签到/签退)
and refund configuration. Owned by mis_adapter/agreements.py, refunds.py
and link_state.py.

`agreement_records` is the history (one row per signed agreement, kept when
it ends) and the idempotency store of both serials; the older `agreements`
table stays the per-account index of the current agreement that bill
issuance reads, written only through mis_adapter.agreements."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from mis_adapter.db.base import Base, BigId, Money

TZ = sa.DateTime(timezone=True)


class AgreementRecord(Base):
    """One auto-debit agreement (代扣协议) as signed by a bank, and its end."""
    __tablename__ = "agreement_records"
    __table_args__ = (sa.UniqueConstraint("bank_id", "agreement_serial"),
                      sa.UniqueConstraint("bank_id", "end_serial"),
                      sa.Index("ix_agreement_records_bank_id", "bank_id", "agreement_id"),
                      sa.Index("ix_agreement_records_account", "account_no", "state"))
    agreement_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[str] = mapped_column(sa.String(16))
    agreement_serial: Mapped[str] = mapped_column(sa.String(32))
    account_no: Mapped[str] = mapped_column(sa.String(10))
    savings_account_ref: Mapped[str] = mapped_column(sa.String(32))
    # bills above it are not fed; NULL: no limit
    debit_limit_fen: Mapped[int | None] = mapped_column(Money, nullable=True)
    # bills issued on or after it are fed
    start_date: Mapped[dt.date] = mapped_column(sa.Date)
    signed_at: Mapped[dt.datetime] = mapped_column(TZ)
    # ACTIVE or ENDED
    state: Mapped[str] = mapped_column(sa.String(8))
    end_serial: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)
    end_reason: Mapped[str] = mapped_column(sa.String(128), default="")
    end_date: Mapped[dt.date | None] = mapped_column(sa.Date, nullable=True)
    ended_at: Mapped[dt.datetime | None] = mapped_column(TZ, nullable=True)


class FeedWithdrawal(Base):
    """A feed notice that had no result when its account's agreement ended:
    redelivered marked `withdrawn`, to be answered NOT_DEBITED."""
    __tablename__ = "feed_withdrawals"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    account_no: Mapped[str] = mapped_column(sa.String(10))
    agreement_id: Mapped[int] = mapped_column(sa.BigInteger)
    withdrawn_at: Mapped[dt.datetime] = mapped_column(TZ)


class BankLink(Base):
    """A bank's link state as the utility records it, and its refund choice.
    No row: the bank never signed on or off (served as open) and keeps
    over-debits as prepaid credit."""
    __tablename__ = "bank_links"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    # SIGNED_ON, SIGNED_OFF, or OPEN (configured but never signed on or off: served as open)
    state: Mapped[str] = mapped_column(sa.String(12))
    # the business date of the last sign-on or sign-off
    business_date: Mapped[dt.date] = mapped_column(sa.Date)
    changed_at: Mapped[dt.datetime] = mapped_column(TZ)
    # PREPAID (over-debits stay prepaid credit) or REFUND (offered back to the bank)
    refund_mode: Mapped[str] = mapped_column(sa.String(8), default="PREPAID")


class RefundOffer(Base):
    """A listed refund (feed_refunds) offered back to the bank: its amount
    left the account's prepaid credit when offered; the bank acknowledges it
    once it credited the savings account, and it counts in the net
    settlement of `settlement_date`."""
    __tablename__ = "refund_offers"
    __table_args__ = (sa.UniqueConstraint("bank_id", "credit_serial"),
                      sa.Index("ix_refund_offers_open", "bank_id", "state", "refund_id"),
                      sa.Index("ix_refund_offers_day", "bank_id", "settlement_date"))
    refund_id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    bank_id: Mapped[str] = mapped_column(sa.String(16))
    account_no: Mapped[str] = mapped_column(sa.String(10))
    bill_id: Mapped[int] = mapped_column(sa.BigInteger)
    original_serial: Mapped[str] = mapped_column(sa.String(32))
    amount_fen: Mapped[int] = mapped_column(Money)
    savings_account_ref: Mapped[str] = mapped_column(sa.String(32), default="")
    # OFFERED, ACKNOWLEDGED
    state: Mapped[str] = mapped_column(sa.String(12))
    offered_at: Mapped[dt.datetime] = mapped_column(TZ)
    credit_serial: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)
    acknowledged_at: Mapped[dt.datetime | None] = mapped_column(TZ, nullable=True)
    settlement_date: Mapped[dt.date | None] = mapped_column(sa.Date, nullable=True)
