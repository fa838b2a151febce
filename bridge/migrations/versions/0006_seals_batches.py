"""audit chain: one seal per batch of audit lines (bridge_audit_seal_batches), append-only

The sealer wrote one bridge_audit_seals row per audit line (two 64-character hex hashes, the columns,
two index entries: 0.82 rows per pay). It now writes one row per pass, holding the ids and SHA-256
digests of up to SEAL_BATCH_MAX lines, chained seal to seal (yindian_common.audit_chain); verify
still names each edited, deleted or reordered line. bridge_audit_seals keeps the chain sealed before
and is no longer appended to: the first batch seal continues it.

Downgrade: the batch seals' lines are sealed again as per-row seals continuing bridge_audit_seals
(what the code before verifies), but only once the whole chain verifies (a tampered chain is
refused, not laundered); then the table goes.

Revision ID: 0006_seals_batches
Revises: 0005_journal_lean_indexes
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from yindian_common.audit_chain import append_only_ddl, drop_append_only_ddl

revision = '0006_seals_batches'
down_revision = '0005_journal_lean_indexes'
branch_labels = None
depends_on = None

# MEDIUMBLOB on MariaDB: a BLOB holds only 64 KiB (2,000 digests)
BLOB = sa.LargeBinary().with_variant(mysql.MEDIUMBLOB(), 'mysql', 'mariadb')
TABLE = 'bridge_audit_seal_batches'


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
        sa.PrimaryKeyConstraint('seal_no'),
        sa.UniqueConstraint('last_entry_id'),
    )
    for stmt in append_only_ddl(op.get_bind().dialect.name, TABLE):
        op.execute(stmt)


def downgrade() -> None:
    from bridge.journal.audit_chain import AUDIT_CHAIN
    AUDIT_CHAIN.to_row_seals(op.get_bind())
    for stmt in drop_append_only_ddl(op.get_bind().dialect.name, TABLE):
        op.execute(stmt)
    op.drop_table(TABLE)
