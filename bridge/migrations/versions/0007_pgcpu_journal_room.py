"""bridge journal pages keep room for each row's outcome (PostgreSQL: fillfactor 50)

A pay's row is inserted PENDING and updated once, milliseconds later, with its outcome. The update
changes `state`, which the due-rows index names, so it is never HOT; but where its new version goes
still matters. Pages were filled to the brim by the inserts, so 93 % of the outcomes (pg_walinspect
under bench-ratio) went to another page: PostgreSQL then marks the old version locked and WAL-logs
that lock before it drops the page lock to find room (a Heap LOCK record per pay), searches the free
space map or extends the table, dirties two heap pages, and logs the new version whole. With half of
each page left free by the inserts, the outcome lands on its row's own page: one page, no lock
record, and the new version logged as the bytes that changed (PostgreSQL's prefix/suffix
compression applies only within a page). Pruning reclaims the old versions as pages are revisited.
The cost is disk: settled pages hold their rows' final versions only, about two thirds full.

fillfactor applies to pages written after it is set: rows already in the journal stay where they
are (settled, they are not updated again). SQLite and MariaDB: nothing (no fillfactor; MariaDB's
InnoDB updates in place).

Revision ID: 0007_pgcpu_journal_room
Revises: 0006_seals_batches
"""
from alembic import op

revision = '0007_pgcpu_journal_room'
down_revision = '0006_seals_batches'
branch_labels = None
depends_on = None

# bridge.journal.schema.JOURNAL_FILLFACTOR as this revision set it
JOURNAL_FILLFACTOR = 50


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'ALTER TABLE bridge_journal SET (fillfactor = {JOURNAL_FILLFACTOR})')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE bridge_journal RESET (fillfactor)')
