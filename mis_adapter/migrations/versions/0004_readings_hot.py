"""readings: on PostgreSQL room on each page for every reading's one update
(fillfactor 50), so that issuing a period's bills (issue_bills marks each reading
billed) is a HOT update: `billed` is in no index, and PostgreSQL writes no index
entry for an updated row whose new version fits on its page. A reading is
written once and updated once, by the issue, and the new version is the same
width, so half of each page holds every row's next version. On full pages each
marked reading wrote an entry in each of the table's three indexes (primary key,
account_no, (meter_no, period)) and was the largest share of issuance's database
time (bench-feed, 100k bills).

The cost is space: the readings' pages hold half as many rows. MariaDB and
SQLite have no fillfactor; nothing changes there.

fillfactor applies to pages written after it is set: an existing table gets it as
a new period's readings fill new pages (or as it is rewritten).

Revision ID: 0004_readings_hot
Revises: 0003
"""
from alembic import op

revision = '0004_readings_hot'
down_revision = '0003'
branch_labels = None
depends_on = None

FILLFACTOR = 50


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'ALTER TABLE readings SET (fillfactor = {FILLFACTOR})')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE readings RESET (fillfactor)')
