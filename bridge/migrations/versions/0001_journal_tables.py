"""journal tables: bridge_journal and bridge_audit, as create_all made them before migrations

Revision ID: 0001
Revises:

"""
import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'bridge_journal',
        sa.Column('kind', sa.String(6), nullable=False),
        sa.Column('serial', sa.String(32), nullable=False),
        sa.Column('bank_id', sa.String(16), nullable=False),
        sa.Column('account_no', sa.String(10), nullable=False),
        sa.Column('original_serial', sa.String(32), nullable=False),
        sa.Column('amount_fen', sa.BigInteger(), nullable=False),
        sa.Column('outlet_code', sa.String(16), nullable=False),
        sa.Column('teller_id', sa.String(16), nullable=False),
        sa.Column('channel', sa.Integer(), nullable=False),
        sa.Column('bank_balance_fen', sa.BigInteger(), nullable=True),
        sa.Column('reason', sa.String(128), nullable=False),
        sa.Column('state', sa.String(12), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('body', sa.LargeBinary(), nullable=True),
        sa.Column('message', sa.String(256), nullable=False),
        sa.Column('reversal_serial', sa.String(32), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_ms', sa.BigInteger(), nullable=False),
        sa.Column('business_date', sa.Date(), nullable=False),
        sa.Column('created_at', TZ, nullable=False),
        sa.Column('updated_at', TZ, nullable=False),
        sa.PrimaryKeyConstraint('kind', 'serial'),
    )
    op.create_index('ix_bridge_journal_state_due', 'bridge_journal', ['state', 'next_attempt_ms'])
    op.create_index('ix_bridge_journal_day_state', 'bridge_journal', ['business_date', 'state'])
    op.create_index('ix_bridge_journal_original', 'bridge_journal', ['original_serial'])
    op.create_table(
        'bridge_audit',
        sa.Column('audit_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True,
                  nullable=False),
        sa.Column('at', TZ, nullable=False),
        sa.Column('kind', sa.String(6), nullable=False),
        sa.Column('serial', sa.String(32), nullable=False),
        sa.Column('bank_id', sa.String(16), nullable=False),
        sa.Column('amount_fen', sa.BigInteger(), nullable=False),
        sa.Column('state', sa.String(12), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('detail', sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint('audit_id'),
    )
    op.create_index('ix_bridge_audit_serial', 'bridge_audit', ['kind', 'serial'])


def downgrade() -> None:
    op.drop_index('ix_bridge_audit_serial', table_name='bridge_audit')
    op.drop_table('bridge_audit')
    op.drop_index('ix_bridge_journal_original', table_name='bridge_journal')
    op.drop_index('ix_bridge_journal_day_state', table_name='bridge_journal')
    op.drop_index('ix_bridge_journal_state_due', table_name='bridge_journal')
    op.drop_table('bridge_journal')
