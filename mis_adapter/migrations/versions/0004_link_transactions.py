"""link transactions: agreement records, withdrawn notices, bank link state, refund offers

Revision ID: 0004_link
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = '0004_link'
down_revision = '0003'
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('agreement_records',
    sa.Column('agreement_id', BigId, autoincrement=True, nullable=False),
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('agreement_serial', sa.String(length=32), nullable=False),
    sa.Column('account_no', sa.String(length=10), nullable=False),
    sa.Column('savings_account_ref', sa.String(length=32), nullable=False),
    sa.Column('debit_limit_fen', sa.BigInteger(), nullable=True),
    sa.Column('start_date', sa.Date(), nullable=False),
    sa.Column('signed_at', TZ, nullable=False),
    sa.Column('state', sa.String(length=8), nullable=False),
    sa.Column('end_serial', sa.String(length=32), nullable=True),
    sa.Column('end_reason', sa.String(length=128), nullable=False),
    sa.Column('end_date', sa.Date(), nullable=True),
    sa.Column('ended_at', TZ, nullable=True),
    sa.PrimaryKeyConstraint('agreement_id', name=op.f('pk_agreement_records')),
    sa.UniqueConstraint('bank_id', 'agreement_serial', name=op.f('uq_agreement_records_bank_id_agreement_serial')),
    sa.UniqueConstraint('bank_id', 'end_serial', name=op.f('uq_agreement_records_bank_id_end_serial'))
    )
    with op.batch_alter_table('agreement_records', schema=None) as batch_op:
        batch_op.create_index('ix_agreement_records_bank_id', ['bank_id', 'agreement_id'], unique=False)
        batch_op.create_index('ix_agreement_records_account', ['account_no', 'state'], unique=False)

    with op.batch_alter_table('agreements', schema=None) as batch_op:
        batch_op.add_column(sa.Column('agreement_id', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('debit_limit_fen', sa.BigInteger(), nullable=True))

    op.create_table('feed_withdrawals',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('account_no', sa.String(length=10), nullable=False),
    sa.Column('agreement_id', sa.BigInteger(), nullable=False),
    sa.Column('withdrawn_at', TZ, nullable=False),
    sa.PrimaryKeyConstraint('bank_id', 'seq', name=op.f('pk_feed_withdrawals'))
    )
    op.create_table('bank_links',
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=12), nullable=False),
    sa.Column('business_date', sa.Date(), nullable=False),
    sa.Column('changed_at', TZ, nullable=False),
    sa.Column('refund_mode', sa.String(length=8), nullable=False),
    sa.PrimaryKeyConstraint('bank_id', name=op.f('pk_bank_links'))
    )
    op.create_table('refund_offers',
    sa.Column('refund_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('bank_id', sa.String(length=16), nullable=False),
    sa.Column('account_no', sa.String(length=10), nullable=False),
    sa.Column('bill_id', sa.BigInteger(), nullable=False),
    sa.Column('original_serial', sa.String(length=32), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('savings_account_ref', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=12), nullable=False),
    sa.Column('offered_at', TZ, nullable=False),
    sa.Column('credit_serial', sa.String(length=32), nullable=True),
    sa.Column('acknowledged_at', TZ, nullable=True),
    sa.Column('settlement_date', sa.Date(), nullable=True),
    sa.PrimaryKeyConstraint('refund_id', name=op.f('pk_refund_offers')),
    sa.UniqueConstraint('bank_id', 'credit_serial', name=op.f('uq_refund_offers_bank_id_credit_serial'))
    )
    with op.batch_alter_table('refund_offers', schema=None) as batch_op:
        batch_op.create_index('ix_refund_offers_open', ['bank_id', 'state', 'refund_id'], unique=False)
        batch_op.create_index('ix_refund_offers_day', ['bank_id', 'settlement_date'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('refund_offers', schema=None) as batch_op:
        batch_op.drop_index('ix_refund_offers_day')
        batch_op.drop_index('ix_refund_offers_open')
    op.drop_table('refund_offers')
    op.drop_table('bank_links')
    op.drop_table('feed_withdrawals')
    with op.batch_alter_table('agreements', schema=None) as batch_op:
        batch_op.drop_column('debit_limit_fen')
        batch_op.drop_column('agreement_id')
    with op.batch_alter_table('agreement_records', schema=None) as batch_op:
        batch_op.drop_index('ix_agreement_records_account')
        batch_op.drop_index('ix_agreement_records_bank_id')
    op.drop_table('agreement_records')
