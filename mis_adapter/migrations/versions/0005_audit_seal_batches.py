"""audit chain: one seal per batch of journal entries (journal_seal_batches), append-only

The sealer wrote one journal_seals row per journal entry (two 64-character hex hashes, the columns,
two index entries: 0.87 rows per pay). It now writes one row per pass and chain, holding the ids and
SHA-256 digests of up to SEAL_BATCH_MAX entries, chained seal to seal (yindian_common.audit_chain);
verify still names each edited, deleted or reordered entry. journal_seals keeps the chain sealed
before and is no longer appended to: the first batch seal continues it.

Downgrade: the batch seals' entries are sealed again as per-row seals continuing journal_seals (what
the code before verifies), but only once the whole chain verifies (a tampered chain is refused, not
laundered); then the table goes.

Revision ID: 0005_audit_seal_batches
Revises: 0004_audit_chain
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from yindian_common.audit_chain import append_only_ddl, drop_append_only_ddl

revision = '0005_audit_seal_batches'
down_revision = '0004_audit_chain'
branch_labels = None
depends_on = None

# MEDIUMBLOB on MariaDB: a BLOB holds only 64 KiB (2,000 digests)
BLOB = sa.LargeBinary().with_variant(mysql.MEDIUMBLOB(), 'mysql', 'mariadb')
TABLE = 'journal_seal_batches'


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column('seal_no', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('last_entry_id', sa.BigInteger(), nullable=False),
        sa.Column('entry_count', sa.Integer(), nullable=False),
        sa.Column('id_sum', sa.BigInteger(), nullable=False),
        sa.Column('entry_ids', BLOB, nullable=False),
        sa.Column('digests', BLOB, nullable=False),
        sa.Column('columns', sa.String(length=512), nullable=False),
        sa.Column('prev_hash', sa.String(length=64), nullable=False),
        sa.Column('seal_hash', sa.String(length=64), nullable=False),
        sa.Column('sealed_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('seal_no', name=op.f('pk_journal_seal_batches')),
        sa.UniqueConstraint('last_entry_id', name=op.f('uq_journal_seal_batches_last_entry_id')),
    )
    for stmt in append_only_ddl(op.get_bind().dialect.name, TABLE):
        op.execute(stmt)


def downgrade() -> None:
    from mis_adapter.db.audit import JOURNAL_CHAIN
    JOURNAL_CHAIN.to_row_seals(op.get_bind())
    for stmt in drop_append_only_ddl(op.get_bind().dialect.name, TABLE):
        op.execute(stmt)
    op.drop_table(TABLE)
