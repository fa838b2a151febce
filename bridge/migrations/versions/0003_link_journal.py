"""link journal: bridge_link_journal (agreements, refund acknowledgements, sign-on/off), append-only

Revision ID: 0003_link_journal
Revises: 0002_journal_caller

"""
import sqlalchemy as sa
from alembic import op

revision = '0003_link_journal'
down_revision = '0002_journal_caller'
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'bridge_link_journal',
        sa.Column('line_id', BigId, autoincrement=True, nullable=False),
        sa.Column('at', TZ, nullable=False),
        sa.Column('bank_id', sa.String(16), nullable=False),
        sa.Column('kind', sa.String(16), nullable=False),
        sa.Column('serial', sa.String(32), nullable=False),
        sa.Column('account_no', sa.String(10), nullable=False),
        sa.Column('amount_fen', sa.BigInteger(), nullable=False),
        sa.Column('phase', sa.String(10), nullable=False),
        sa.Column('outcome', sa.String(20), nullable=False),
        sa.Column('detail', sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint('line_id'),
    )
    with op.batch_alter_table('bridge_link_journal', schema=None) as batch_op:
        batch_op.create_index('ix_bridge_link_journal_serial', ['kind', 'serial'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('bridge_link_journal', schema=None) as batch_op:
        batch_op.drop_index('ix_bridge_link_journal_serial')
    op.drop_table('bridge_link_journal')
