"""bills: on PostgreSQL room on each page for every bill's settling update (fillfactor
50, was 90 since 0004_bills_hot), so that settling a batch of bills is HOT throughout.

No index covers a column a payment changes (0004_bills_hot), so a settled bill's new
version needs no index entry when it fits on the bill's page. At fillfactor 90 a page
had room for the next version of about one bill in ten: the bill feed settles every
bill of a 5,000-result batch in one UPDATE, and 88 % of those updates (bench-feed,
100k bills: 11,820 HOT of 100,000) went to another page with an entry in the primary
key and in (account_no, period) each. The same 100k settles in 5,000-row statements
took 1.57 s at fillfactor 90 and 0.69 s at 50 (helper's measurement, PostgreSQL 15,
loaded box), every one HOT.

A bill is written once and settled once, at the same width. The table ends the same
size either way once its bills are paid (3,449 pages at 50 against 3,625 at 90 for
100k bills, each updated once): the non-HOT versions took new pages. Before they are
paid, a period's bills take twice the pages; after a VACUUM, pages of a table at 90
are refilled by new bills up to 90 %, at 50 up to 50 %, so scans of all bills (the
arrears reports) read up to twice the pages. MariaDB and SQLite have no fillfactor.

fillfactor applies to pages written after it is set: an existing table gets it as
new bills fill new pages (or as it is rewritten).

Revision ID: 0004_bills_feed_hot
Revises: 0003; depends on 0004_bills_hot (which set 90)
"""
from alembic import op

revision = '0004_bills_feed_hot'
down_revision = '0003'
branch_labels = None
depends_on = '0004_bills_hot'  # applied after it: it sets 90, this 50

FILLFACTOR = 50
PREVIOUS_FILLFACTOR = 90  # 0004_bills_hot's


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'ALTER TABLE bills SET (fillfactor = {FILLFACTOR})')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'ALTER TABLE bills SET (fillfactor = {PREVIOUS_FILLFACTOR})')
