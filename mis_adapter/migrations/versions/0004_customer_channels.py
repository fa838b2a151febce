"""customer channels: voice dunning attempts and opt-outs

Revision ID: 0004_channels
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = '0004_channels'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dunning_attempts',
    sa.Column('attempt_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('campaign_id', sa.String(length=32), nullable=False),
    sa.Column('account_no', sa.String(length=10), nullable=False),
    sa.Column('attempt_no', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('placed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('outcome_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('detail', sa.String(length=128), nullable=False),
    sa.Column('operator', sa.String(length=64), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('attempt_id', name=op.f('pk_dunning_attempts')),
    sa.UniqueConstraint('campaign_id', 'account_no', 'attempt_no',
                        name=op.f('uq_dunning_attempts_campaign_id_account_no_attempt_no'))
    )
    with op.batch_alter_table('dunning_attempts', schema=None) as batch_op:
        batch_op.create_index('ix_dunning_attempts_account_at', ['account_no', 'placed_at'], unique=False)
    op.create_table('dunning_opt_outs',
    sa.Column('account_no', sa.String(length=10), nullable=False),
    sa.Column('opted_out', sa.Boolean(), nullable=False),
    sa.Column('reason', sa.String(length=128), nullable=False),
    sa.Column('operator', sa.String(length=64), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('account_no', name=op.f('pk_dunning_opt_outs'))
    )


def downgrade() -> None:
    op.drop_table('dunning_opt_outs')
    with op.batch_alter_table('dunning_attempts', schema=None) as batch_op:
        batch_op.drop_index('ix_dunning_attempts_account_at')
    op.drop_table('dunning_attempts')
