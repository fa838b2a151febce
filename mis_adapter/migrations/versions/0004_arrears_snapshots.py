"""Arrears snapshots (mis_adapter/arrears_snapshot.py, mis_adapter/db/arrears.py): the bills in
arrears at the end of a closed day, which an arrears report for that day or a later one reads
instead of every bill. Two new tables; nothing existing changes.

Revision ID: 0004_arrears_snapshots
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004_arrears_snapshots'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'arrears_snapshots',
        sa.Column('as_of', sa.Date(), nullable=False),
        sa.Column('state', sa.String(length=8), nullable=False),
        sa.Column('bills_upto', sa.BigInteger(), nullable=False),
        sa.Column('reconciled_count', sa.BigInteger(), nullable=False),
        sa.Column('bills', sa.BigInteger(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('as_of', name=op.f('pk_arrears_snapshots')))
    op.create_table(
        'arrears_snapshot_bills',
        sa.Column('as_of', sa.Date(), nullable=False),
        sa.Column('bill_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('account_no', sa.String(length=10), nullable=False),
        sa.Column('period', sa.String(length=6), nullable=False),
        sa.Column('unpaid_fen', sa.BigInteger(), nullable=False),
        sa.Column('accrual_micro', sa.BigInteger(), nullable=False),
        sa.Column('accrual_date', sa.Date(), nullable=False),
        sa.Column('late_fee_paid_fen', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('as_of', 'bill_id', name=op.f('pk_arrears_snapshot_bills')))


def downgrade() -> None:
    op.drop_table('arrears_snapshot_bills')
    op.drop_table('arrears_snapshots')
