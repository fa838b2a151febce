"""the caller's identity on every journal row

Who sent the request: the bank core's certificate identity (its CN, else
its first SAN), or in plain-text loopback mode its x-yindian-bank-id (the
bridge's own bank when it sent none). Rows journaled before this revision
hold ''.

Revision ID: 0002_journal_caller
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = '0002_journal_caller'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('bridge_journal', sa.Column('caller', sa.String(16), nullable=False, server_default=''))


def downgrade() -> None:
    op.drop_column('bridge_journal', 'caller')
