"""reconciliation tables

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('recon_lines',
    sa.Column('line_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('settlement_date', sa.Date(), nullable=False),
    sa.Column('bank_serial', sa.String(length=32), nullable=False),
    sa.Column('outcome', sa.String(length=12), nullable=False),
    sa.Column('bank_line_no', sa.BigInteger(), nullable=False),
    sa.Column('bank_account_no', sa.String(length=10), nullable=False),
    sa.Column('mis_account_no', sa.String(length=10), nullable=False),
    sa.Column('bank_amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('mis_amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('bank_status', sa.String(length=10), nullable=False),
    sa.Column('mis_state', sa.String(length=10), nullable=False),
    sa.Column('detail', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('line_id', name=op.f('pk_recon_lines'))
    )
    with op.batch_alter_table('recon_lines', schema=None) as batch_op:
        batch_op.create_index('ix_recon_lines_day', ['bank_id', 'settlement_date', 'line_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('recon_lines', schema=None) as batch_op:
        batch_op.drop_index('ix_recon_lines_day')
    op.drop_table('recon_lines')
