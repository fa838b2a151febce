"""bulk paths: indexes that let the arrears reports read only the bills that
can be in arrears at an as-of date (those paid after it, those touched by
payments reversed after it, those accrued past it) instead of every bill

Revision ID: 0004_bulk
Revises: 0003
"""
from alembic import op

revision = '0004_bulk'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_bills_paid_on', 'bills', ['paid_on'], unique=False)
    op.create_index('ix_payments_reversed_on', 'payments', ['reversed_on'], unique=False)
    op.create_index('ix_bills_accrual_date', 'bills', ['accrual_date'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_bills_accrual_date', table_name='bills')
    op.drop_index('ix_payments_reversed_on', table_name='payments')
    op.drop_index('ix_bills_paid_on', table_name='bills')
