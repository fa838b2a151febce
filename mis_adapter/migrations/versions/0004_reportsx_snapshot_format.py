"""Arrears snapshots at the day: each snapshot says what its rows are (`format`) and with which late-fee
rates they were accrued (`rates`), so that a report reads only a snapshot it can price exactly
(mis_adapter/arrears_snapshot.py); each bill says whether its state at the day is also what a replay
from its issue gives (`replay_ok`), so that a report need not replay it when a payment after the report's
date touches it. Snapshots taken before this revision are format 1 (the rows of the bills
untouched since the day, copied); reports ignore them and the job drops them.

Revision ID: 0004_reportsx_snapshot_format
Revises: 0004_arrears_snapshots
"""
import sqlalchemy as sa
from alembic import op

revision = '0004_reportsx_snapshot_format'
down_revision = '0004_arrears_snapshots'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('arrears_snapshots', schema=None) as batch_op:
        batch_op.add_column(sa.Column('format', sa.SmallInteger(), server_default='1', nullable=False))
        batch_op.add_column(sa.Column('rates', sa.String(length=80), server_default='', nullable=False))
    with op.batch_alter_table('arrears_snapshot_bills', schema=None) as batch_op:
        batch_op.add_column(sa.Column('replay_ok', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('arrears_snapshot_bills', schema=None) as batch_op:
        batch_op.drop_column('replay_ok')
    with op.batch_alter_table('arrears_snapshots', schema=None) as batch_op:
        batch_op.drop_column('rates')
        batch_op.drop_column('format')
