"""Bill feed tables (实时划拨): the transactional outbox with its gapless
per-bank sequence, the subscriber's cursor, the one-stream-per-bank lease,
the debit results the bank sent back, and debits listed for refund.
Owned by the bill-feed work; see mis_adapter/feed.py and feed_service.py.

`feed_sequences` is a counter row per bank, locked and incremented in the
same transaction that issues the bills: seqs are therefore gapless and in
commit order per bank (an autoincrement is neither)."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from mis_adapter.db.base import Base, BigId, Money

TZ = sa.DateTime(timezone=True)


class FeedSequence(Base):
    """The last seq handed out for a bank; its row lock serializes issuers."""
    __tablename__ = "feed_sequences"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    last_seq: Mapped[int] = mapped_column(sa.BigInteger, default=0)


class OutboxRow(Base):
    """One bill notice for one bank, written with the bill."""
    __tablename__ = "feed_outbox"
    __table_args__ = (sa.Index("ix_feed_outbox_bill", "bill_id"),)
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    bill_id: Mapped[int] = mapped_column(sa.BigInteger)
    account_no: Mapped[str] = mapped_column(sa.String(10))
    period: Mapped[str] = mapped_column(sa.String(6))
    kwh: Mapped[int] = mapped_column(sa.BigInteger)
    # what the bank should debit: principal less prepaid credit applied at issue
    amount_fen: Mapped[int] = mapped_column(Money)
    due_date: Mapped[dt.date] = mapped_column(sa.Date)
    issued_at: Mapped[dt.datetime] = mapped_column(TZ)


class FeedCursor(Base):
    """Every seq at or below `acked_through_seq` has a stored result."""
    __tablename__ = "feed_cursors"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    acked_through_seq: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(TZ)


class FeedLease(Base):
    """At most one active stream per bank, across replicas: the holder token
    is one stream's; a lease not renewed by `expires_at` may be taken."""
    __tablename__ = "feed_leases"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    holder: Mapped[str] = mapped_column(sa.String(64))
    acquired_at: Mapped[dt.datetime] = mapped_column(TZ)
    expires_at: Mapped[dt.datetime] = mapped_column(TZ)


class DebitResultRow(Base):
    """The bank's answer to one notice, and what the utility did with it."""
    __tablename__ = "feed_results"
    __table_args__ = (sa.Index("ix_feed_results_serial", "bank_id", "bank_serial"),)
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    # DEBITED or INSUFFICIENT_FUNDS
    outcome: Mapped[str] = mapped_column(sa.String(20))
    bank_serial: Mapped[str] = mapped_column(sa.String(32), default="")
    amount_fen: Mapped[int] = mapped_column(Money)
    bill_id: Mapped[int] = mapped_column(sa.BigInteger)
    account_no: Mapped[str] = mapped_column(sa.String(10))
    # PAID (settled the bill), POSTED (general allocation), REFUND (bill settled
    # elsewhere: prepaid credit listed for refund), DUNNING, NO_ARREARS
    disposition: Mapped[str] = mapped_column(sa.String(12))
    received_at: Mapped[dt.datetime] = mapped_column(TZ)


class RefundRow(Base):
    """A debit (or its part) that became prepaid credit because another
    channel had settled the bill: listed for the bank to refund."""
    __tablename__ = "feed_refunds"
    __table_args__ = (sa.UniqueConstraint("bank_id", "seq"),)
    refund_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[str] = mapped_column(sa.String(16))
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    bill_id: Mapped[int] = mapped_column(sa.BigInteger)
    account_no: Mapped[str] = mapped_column(sa.String(10), index=True)
    bank_serial: Mapped[str] = mapped_column(sa.String(32))
    amount_fen: Mapped[int] = mapped_column(Money)
    payment_id: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    listed_at: Mapped[dt.datetime] = mapped_column(TZ)
