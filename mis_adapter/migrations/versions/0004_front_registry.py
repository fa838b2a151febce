"""front registry: one serial space per bank across branch databases

Revision ID: 0004_front_registry
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = '0004_front_registry'
down_revision = '0003'
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('front_serials',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('serial', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('home', sa.String(length=2), nullable=False),
    sa.Column('account_no', sa.String(length=10), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=8), nullable=False),
    sa.Column('claimed_at', TZ, nullable=False),
    sa.Column('settled_at', TZ, nullable=True),
    sa.PrimaryKeyConstraint('bank_id', 'serial', name=op.f('pk_front_serials'))
    )
    with op.batch_alter_table('front_serials', schema=None) as batch_op:
        batch_op.create_index('ix_front_serials_state', ['state', 'claimed_at'], unique=False)
    op.create_table('front_cancels',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('cancel_serial', sa.String(length=32), nullable=False),
    sa.Column('original_serial', sa.String(length=32), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('claimed_at', TZ, nullable=False),
    sa.PrimaryKeyConstraint('bank_id', 'cancel_serial', name=op.f('pk_front_cancels'))
    )
    op.create_table('front_recon_days',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('settlement_date', sa.Date(), nullable=False),
    sa.Column('reconciled_at', TZ, nullable=False),
    sa.Column('summary_json', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('bank_id', 'settlement_date', name=op.f('pk_front_recon_days'))
    )
    op.create_table('front_feed_map',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('home', sa.String(length=2), nullable=False),
    sa.Column('local_seq', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('bank_id', 'seq', name=op.f('pk_front_feed_map')),
    sa.UniqueConstraint('bank_id', 'home', 'local_seq', name=op.f('uq_front_feed_map_bank_id_home_local_seq'))
    )
    op.create_table('front_feed_heads',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('home', sa.String(length=2), nullable=False),
    sa.Column('merged_through', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('bank_id', 'home', name=op.f('pk_front_feed_heads'))
    )


def downgrade() -> None:
    op.drop_table('front_feed_heads')
    op.drop_table('front_feed_map')
    op.drop_table('front_recon_days')
    op.drop_table('front_cancels')
    with op.batch_alter_table('front_serials', schema=None) as batch_op:
        batch_op.drop_index('ix_front_serials_state')
    op.drop_table('front_serials')
