"""audit chain: journal_seals, and the journal made append-only

Revision ID: 0004_audit_chain
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

from yindian_common.audit_chain import append_only_ddl, drop_append_only_ddl

revision = '0004_audit_chain'
down_revision = '0003'
branch_labels = None
depends_on = None

APPEND_ONLY = ('journal', 'journal_seals')


def upgrade() -> None:
    op.create_table('journal_seals',
    sa.Column('seal_no', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('entry_id', sa.BigInteger(), nullable=False),
    sa.Column('columns', sa.String(length=512), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('entry_hash', sa.String(length=64), nullable=False),
    sa.Column('sealed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('seal_no', name=op.f('pk_journal_seals')),
    sa.UniqueConstraint('entry_id', name=op.f('uq_journal_seals_entry_id'))
    )
    dialect = op.get_bind().dialect.name
    for table in APPEND_ONLY:
        for stmt in append_only_ddl(dialect, table):
            op.execute(stmt)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in APPEND_ONLY:
        for stmt in drop_append_only_ddl(dialect, table):
            op.execute(stmt)
    op.drop_table('journal_seals')
