"""bills: no index on status, and on PostgreSQL room on each page (fillfactor 90),
so that a payment's bill update can be HOT there: PostgreSQL writes no index entry
for an updated row only when no indexed column changes and the new version fits on
the row's page, and every bill a payment touches changes status (and paid_on and
accrual_date, unindexed since 0004_bills_indexes). With ix_bills_status_due each
settled bill wrote three index entries (primary key, (account_no, period), status);
HOT, none. On MariaDB and SQLite one secondary index less to write.

Nothing needs the index: the metrics' unpaid-bills count reads the bills in one
scan (metrics_collector), like the arrears reports; every other reader of unpaid
bills names the account, which (account_no, period) serves.

fillfactor applies to pages written after it is set: an existing table gets it as
it is rewritten (VACUUM FULL or CLUSTER, in a maintenance window) or as new bills
fill new pages.

Revision ID: 0004_bills_hot
Revises: 0003 (after 0001, which made the index)
"""
from alembic import op

revision = '0004_bills_hot'
down_revision = '0003'
branch_labels = None
depends_on = None

FILLFACTOR = 90


def upgrade() -> None:
    op.drop_index('ix_bills_status_due', table_name='bills')
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'ALTER TABLE bills SET (fillfactor = {FILLFACTOR})')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE bills RESET (fillfactor)')
    op.create_index('ix_bills_status_due', 'bills', ['status', 'due_date'], unique=False)
