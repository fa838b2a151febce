"""bank-day lock rows: MariaDB's bank-day lock takes a row of its own, made on
first use in each database, instead of the bank's `banks` row, which branch
databases do not hold (a lock on a missing row locked nothing there, and pays
were not ordered against the day close)

Revision ID: 0004_bank_day_lock
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004_bank_day_lock'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bank_day_locks',
                    sa.Column('bank_id', sa.String(length=16), nullable=False),
                    sa.PrimaryKeyConstraint('bank_id', name=op.f('pk_bank_day_locks')))


def downgrade() -> None:
    op.drop_table('bank_day_locks')
