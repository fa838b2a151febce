"""audit chain: bridge_audit_seals, and bridge_audit made append-only

Revision ID: 0004_audit_chain
Revises: 0003_link_journal
"""
import sqlalchemy as sa
from alembic import op

from yindian_common.audit_chain import append_only_ddl, drop_append_only_ddl

revision = '0004_audit_chain'
down_revision = '0003_link_journal'
branch_labels = None
depends_on = None

APPEND_ONLY = ('bridge_audit', 'bridge_audit_seals')


def upgrade() -> None:
    op.create_table(
        'bridge_audit_seals',
        sa.Column('seal_no', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('entry_id', sa.BigInteger(), nullable=False),
        sa.Column('columns', sa.String(length=512), nullable=False),
        sa.Column('prev_hash', sa.String(length=64), nullable=False),
        sa.Column('entry_hash', sa.String(length=64), nullable=False),
        sa.Column('sealed_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('seal_no'),
        sa.UniqueConstraint('entry_id'),
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
    op.drop_table('bridge_audit_seals')
