"""feed tables: outbox with gapless per-bank seq, cursors, leases, results, refunds

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('feed_sequences',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('last_seq', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('bank_id', name=op.f('pk_feed_sequences'))
    )
    op.create_table('feed_outbox',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('bill_id', sa.BigInteger(), nullable=False),
    sa.Column('account_no', sa.String(length=10), nullable=False),
    sa.Column('period', sa.String(length=6), nullable=False),
    sa.Column('kwh', sa.BigInteger(), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('due_date', sa.Date(), nullable=False),
    sa.Column('issued_at', TZ, nullable=False),
    sa.PrimaryKeyConstraint('bank_id', 'seq', name=op.f('pk_feed_outbox'))
    )
    with op.batch_alter_table('feed_outbox', schema=None) as batch_op:
        batch_op.create_index('ix_feed_outbox_bill', ['bill_id'], unique=False)

    op.create_table('feed_cursors',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('acked_through_seq', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', TZ, nullable=False),
    sa.PrimaryKeyConstraint('bank_id', name=op.f('pk_feed_cursors'))
    )
    op.create_table('feed_leases',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('holder', sa.String(length=64), nullable=False),
    sa.Column('acquired_at', TZ, nullable=False),
    sa.Column('expires_at', TZ, nullable=False),
    sa.PrimaryKeyConstraint('bank_id', name=op.f('pk_feed_leases'))
    )
    op.create_table('feed_results',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('outcome', sa.String(length=20), nullable=False),
    sa.Column('bank_serial', sa.String(length=32), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('bill_id', sa.BigInteger(), nullable=False),
    sa.Column('account_no', sa.String(length=10), nullable=False),
    sa.Column('disposition', sa.String(length=12), nullable=False),
    sa.Column('received_at', TZ, nullable=False),
    sa.PrimaryKeyConstraint('bank_id', 'seq', name=op.f('pk_feed_results'))
    )
    with op.batch_alter_table('feed_results', schema=None) as batch_op:
        batch_op.create_index('ix_feed_results_serial', ['bank_id', 'bank_serial'], unique=False)

    op.create_table('feed_refunds',
    sa.Column('refund_id', BigId, autoincrement=True, nullable=False),
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('bill_id', sa.BigInteger(), nullable=False),
    sa.Column('account_no', sa.String(length=10), nullable=False),
    sa.Column('bank_serial', sa.String(length=32), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('payment_id', sa.BigInteger(), nullable=True),
    sa.Column('listed_at', TZ, nullable=False),
    sa.PrimaryKeyConstraint('refund_id', name=op.f('pk_feed_refunds')),
    sa.UniqueConstraint('bank_id', 'seq', name=op.f('uq_feed_refunds_bank_id_seq'))
    )
    with op.batch_alter_table('feed_refunds', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_feed_refunds_account_no'), ['account_no'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('feed_refunds', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_feed_refunds_account_no'))
    op.drop_table('feed_refunds')
    with op.batch_alter_table('feed_results', schema=None) as batch_op:
        batch_op.drop_index('ix_feed_results_serial')
    op.drop_table('feed_results')
    op.drop_table('feed_leases')
    op.drop_table('feed_cursors')
    with op.batch_alter_table('feed_outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_feed_outbox_bill')
    op.drop_table('feed_outbox')
    op.drop_table('feed_sequences')
