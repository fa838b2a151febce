"""journal indexes a pay's outcome does not touch: on PostgreSQL the due-rows index holds only the
rows a reader looks for (the open states) and the original-serial index only cancels; the day index
goes on every back end (its two readers ask for open states of a day, which the due-rows index serves)

Every pay inserted 4 index entries for its PENDING row and 4 more for its outcome (the update changes
`state`, so it is never HOT): 8 per pay, 18 index blocks hit. Now, on PostgreSQL, a pay inserts 2 (the
key, the due-rows entry while PENDING) and its outcome 1 (the key: a POSTED row is in no partial
index). No reader needed the rest: every query on state asks for PENDING, SUSPECT, REVERSING or
RETRYABLE rows (Journal.due, recover_orphans, in_doubt_count, expedite_retryable, the resolver's
ANY_DUE, the metrics collector), and only cancels have an original serial (Journal.cancels_of).
They name the states and the kind as literals, so that even a generic (prepared) plan proves the
predicate. SQLite and MariaDB keep full indexes (MariaDB has no partial index; SQLite matches a
partial index only against the same literal terms), minus the day index.

Revision ID: 0005_journal_lean_indexes
Revises: 0004_audit_chain
"""
from alembic import op

revision = '0005_journal_lean_indexes'
down_revision = '0004_audit_chain'
branch_labels = None
depends_on = None

# bridge.journal.schema.OPEN_STATES as this revision made the index (tests/bridge/test_journal.py checks)
OPEN_STATES_SQL = "'PENDING', 'RETRYABLE', 'REVERSING', 'SUSPECT'"


def upgrade() -> None:
    op.drop_index('ix_bridge_journal_day_state', table_name='bridge_journal')
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.drop_index('ix_bridge_journal_state_due', table_name='bridge_journal')
    op.create_index('ix_bridge_journal_state_due', 'bridge_journal', ['state', 'next_attempt_ms'],
                    postgresql_where=f"state IN ({OPEN_STATES_SQL})")
    op.drop_index('ix_bridge_journal_original', table_name='bridge_journal')
    op.create_index('ix_bridge_journal_original', 'bridge_journal', ['original_serial'],
                    postgresql_where="kind = 'CANCEL'")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_index('ix_bridge_journal_original', table_name='bridge_journal')
        op.create_index('ix_bridge_journal_original', 'bridge_journal', ['original_serial'])
        op.drop_index('ix_bridge_journal_state_due', table_name='bridge_journal')
        op.create_index('ix_bridge_journal_state_due', 'bridge_journal', ['state', 'next_attempt_ms'])
    op.create_index('ix_bridge_journal_day_state', 'bridge_journal', ['business_date', 'state'])
