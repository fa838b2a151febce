"""The MIS journal without its (bank_id, at) index: nothing in the product reads
the journal by bank and time (the audit chain walks it by entry_id, the primary
key; reconciliation and the reports read payments), and every pay, cancel, debit
and reconciliation line paid for one more index entry and its WAL.

Revision ID: 0004_journal_no_bank_at
Revises: 0003
"""
from alembic import op

revision = '0004_journal_no_bank_at'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_journal_bank_at', table_name='journal')


def downgrade() -> None:
    op.create_index('ix_journal_bank_at', 'journal', ['bank_id', 'at'], unique=False)
