"""customers: on PostgreSQL room on each page for a pay's prepaid-credit update (fillfactor 50)

A pay that adds prepaid credit locks its customer's row and updates prepaid_fen. No index covers
prepaid_fen, so the update is HOT when the new version fits on the row's page. At fillfactor 90
(0004_pgpay_lean_pay) about one in five did not fit under bench-ratio (pg_walinspect: 0.21 non-HOT
customer updates per pay): the paying accounts share pages, and their dead versions wait for
pruning. Each such update went to another page, with a WAL-logged lock of the old version first,
a free-space-map search, and an entry in both of the customers' indexes. Half of each page free
leaves room for several versions of each row until pruning catches up, as bills (0004_bills_feed_hot)
and readings (0004_readings_hot) do. The cost is disk: the customers table takes about twice the
pages (one row per household, read by key).

fillfactor applies to pages written after it is set: an existing table gets it as new customers fill
new pages (or as it is rewritten). MariaDB and SQLite have no fillfactor.

Revision ID: 0004_pgcpu_customers_room
Revises: 0003; depends on 0004_pgpay_lean_pay (which set 90)
"""
from alembic import op

revision = '0004_pgcpu_customers_room'
down_revision = '0003'
branch_labels = None
depends_on = '0004_pgpay_lean_pay'  # applied after it: it sets 90, this 50

FILLFACTOR = 50
PREVIOUS_FILLFACTOR = 90  # 0004_pgpay_lean_pay's


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'ALTER TABLE customers SET (fillfactor = {FILLFACTOR})')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'ALTER TABLE customers SET (fillfactor = {PREVIOUS_FILLFACTOR})')
