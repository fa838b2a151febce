"""bridge_audit without its serial index (ix_bridge_audit_serial)

Every outcome appends an audit line, and each line paid an entry in (kind, serial), a random key:
one of the bridge's five index entries per pay on PostgreSQL (4.1 index blocks hit per pay on
bridge_audit under bench-ratio, with its WAL record and page splits). Nothing in the product reads
the audit by serial: the sealer and `python -m bridge audit verify|seal` walk it by audit_id, and a
pay's journal row (bridge_journal, by its primary key) holds its state and answer; only tests looked
lines up by serial (Journal.audit_lines, now a scan). The audit chain is unchanged (the index is not
a sealed column).

Revision ID: 0008_journalpg_audit_lean
Revises: 0007_pgcpu_journal_room
"""
from alembic import op

revision = '0008_journalpg_audit_lean'
down_revision = '0007_pgcpu_journal_room'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_bridge_audit_serial', table_name='bridge_audit')


def downgrade() -> None:
    op.create_index('ix_bridge_audit_serial', 'bridge_audit', ['kind', 'serial'])
