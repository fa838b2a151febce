"""The MIS tables the bank simulator's checks read (the load check, the feed
benchmark's check), declared here with only the columns they read: bank_sim
imports nothing of mis_adapter (import-linter holds it), and
tests/bank_sim/test_mis_tables.py holds these declarations to the MIS's schema.
Read only: nothing in bank_sim writes the MIS."""
from __future__ import annotations

import sqlalchemy as sa

TZ = sa.DateTime(timezone=True)

payments = sa.table(
    "payments", sa.column("payment_id", sa.BigInteger), sa.column("bank_id", sa.String),
    sa.column("bank_serial", sa.String), sa.column("channel", sa.String), sa.column("state", sa.String),
    sa.column("amount_fen", sa.BigInteger), sa.column("account_no", sa.String), sa.column("posted_at", TZ))

bills = sa.table(
    "bills", sa.column("bill_id", sa.BigInteger), sa.column("period", sa.String), sa.column("status", sa.String),
    sa.column("dunning", sa.Boolean), sa.column("principal_paid_fen", sa.BigInteger),
    sa.column("late_fee_paid_fen", sa.BigInteger))

customers = sa.table("customers", sa.column("account_no", sa.String), sa.column("prepaid_fen", sa.BigInteger))

allocations = sa.table("allocations", sa.column("bill_id", sa.BigInteger), sa.column("payment_id", sa.BigInteger))

feed_outbox = sa.table(
    "feed_outbox", sa.column("bank_id", sa.String), sa.column("seq", sa.BigInteger),
    sa.column("bill_id", sa.BigInteger), sa.column("account_no", sa.String), sa.column("amount_fen", sa.BigInteger))

feed_results = sa.table(
    "feed_results", sa.column("bank_id", sa.String), sa.column("seq", sa.BigInteger),
    sa.column("outcome", sa.String), sa.column("bank_serial", sa.String), sa.column("received_at", TZ))

feed_cursors = sa.table("feed_cursors", sa.column("bank_id", sa.String), sa.column("acked_through_seq", sa.BigInteger))

ALL = (payments, bills, customers, allocations, feed_outbox, feed_results, feed_cursors)
