"""reversed_on indexed only where set: the reports look up payments reversed
after a date (`reversed_on > :as_of`), which a partial index serves, and a pay
(reversed_on NULL) then writes one index entry less. PostgreSQL and SQLite;
MariaDB has no partial indexes and keeps the full one.

Revision ID: 0004_partial_reversed_on
Revises: 0003 (after 0004_bulk, which made the full index)
"""
import sqlalchemy as sa
from alembic import op

revision = '0004_partial_reversed_on'
down_revision = '0003'
branch_labels = None
depends_on = ('0004_bulk',)

PARTIAL = ('postgresql', 'sqlite')
WHERE = sa.text('reversed_on IS NOT NULL')


def upgrade() -> None:
    if op.get_bind().dialect.name not in PARTIAL:
        return
    op.drop_index('ix_payments_reversed_on', table_name='payments')
    op.create_index('ix_payments_reversed_on', 'payments', ['reversed_on'], unique=False,
                    postgresql_where=WHERE, sqlite_where=WHERE)


def downgrade() -> None:
    if op.get_bind().dialect.name not in PARTIAL:
        return
    op.drop_index('ix_payments_reversed_on', table_name='payments')
    op.create_index('ix_payments_reversed_on', 'payments', ['reversed_on'], unique=False)
