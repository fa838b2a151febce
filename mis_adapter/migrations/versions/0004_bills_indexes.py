"""bills: drop the paid_on and accrual_date indexes (0004_bulk made them for the
arrears reports). Every bill a payment settles changes status, paid_on and
accrual_date, so each bill UPDATE wrote an entry in each of them: on PostgreSQL
five index entries per updated bill, three now (the primary key and
(account_no, period) are written anyway unless the update is HOT, and the status
index stays for the metrics' unpaid-bills count); on MariaDB and SQLite, which
touch only the indexes whose columns change, one secondary index instead of three.
The reports read the bills unpaid then in one scan instead (reports._arrears_bills).

Revision ID: 0004_bills_indexes
Revises: 0003 (after 0004_bulk, which made the indexes)
"""
from alembic import op

revision = '0004_bills_indexes'
down_revision = '0003'
branch_labels = None
depends_on = ('0004_bulk',)


def upgrade() -> None:
    op.drop_index('ix_bills_accrual_date', table_name='bills')
    op.drop_index('ix_bills_paid_on', table_name='bills')


def downgrade() -> None:
    op.create_index('ix_bills_paid_on', 'bills', ['paid_on'], unique=False)
    op.create_index('ix_bills_accrual_date', 'bills', ['accrual_date'], unique=False)
