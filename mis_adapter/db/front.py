"""The front database's serial registry (the seed's front-end processor):
with several branch databases, one row per (bank, serial) for every serial
any branch holds, so each bank has one serial space across branches.

- `front_serials`: a pay serial or a tombstoned one, with the branch whose
  database holds it (`home`; '' = the primary database, where tombstones of
  unknown originals live). CLAIMED: taken, the branch transaction may not
  have committed (nothing in the branch yet is "nothing written"); SETTLED:
  the branch holds (or a cancel is acting on) the serial: never released.
- `front_cancels`: a cancel serial and the original it names, so a cancel
  serial is one cancel across branches.
- `front_recon_days`: a bank's day closed in every branch (mis_adapter.recon_branches).
- `front_feed_map`, `front_feed_heads`: the bill feed's one gapless sequence per
  bank, merged from the branch outboxes (mis_adapter.feed_branches).

The tables exist in every MIS database (one migration history), but only
the front database's rows are read or written."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from mis_adapter.db.base import Base, Money

TZ = sa.DateTime(timezone=True)


class FrontSerial(Base):
    __tablename__ = "front_serials"
    __table_args__ = (sa.Index("ix_front_serials_state", "state", "claimed_at"),)
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    serial: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    # PAY (a payment claimed it) or TOMBSTONE (a cancel overtook its payment)
    kind: Mapped[str] = mapped_column(sa.String(10))
    # the branch code whose database holds the serial ('' = the primary database)
    home: Mapped[str] = mapped_column(sa.String(2))
    account_no: Mapped[str] = mapped_column(sa.String(10), default="")
    amount_fen: Mapped[int] = mapped_column(Money)
    # CLAIMED or SETTLED
    state: Mapped[str] = mapped_column(sa.String(8))
    claimed_at: Mapped[dt.datetime] = mapped_column(TZ)
    settled_at: Mapped[dt.datetime | None] = mapped_column(TZ, nullable=True)


class FrontCancel(Base):
    __tablename__ = "front_cancels"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    cancel_serial: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    original_serial: Mapped[str] = mapped_column(sa.String(32))
    amount_fen: Mapped[int] = mapped_column(Money)
    claimed_at: Mapped[dt.datetime] = mapped_column(TZ)


class FrontReconDay(Base):
    """A bank's settlement day reconciled across every branch database: written
    once every branch's close has committed; its summary sums theirs."""
    __tablename__ = "front_recon_days"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    settlement_date: Mapped[dt.date] = mapped_column(sa.Date, primary_key=True)
    reconciled_at: Mapped[dt.datetime] = mapped_column(TZ)
    summary_json: Mapped[str] = mapped_column(sa.Text)


class FrontFeedNotice(Base):
    """The bill feed across branch databases: global, gapless per-bank seq ->
    the notice's home database and its seq in that database's outbox."""
    __tablename__ = "front_feed_map"
    __table_args__ = (sa.UniqueConstraint("bank_id", "home", "local_seq"),)
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    home: Mapped[str] = mapped_column(sa.String(2))
    local_seq: Mapped[int] = mapped_column(sa.BigInteger)


class FrontFeedHead(Base):
    """How far each database's outbox is merged into the global sequence, and
    (home '**') the last global seq handed out: the row the merge locks."""
    __tablename__ = "front_feed_heads"
    bank_id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    home: Mapped[str] = mapped_column(sa.String(2), primary_key=True)
    merged_through: Mapped[int] = mapped_column(sa.BigInteger)
