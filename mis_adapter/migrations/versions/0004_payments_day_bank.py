"""payments: one (settlement_date, bank_id) index instead of (bank_id, settlement_date)
and (settlement_date).

Why: the pay's serial look-up (bank_id = ? AND bank_serial = ?, pay_pg.READ_FOR_PAY
and payments._TAKEN) is a prepared statement with a generic plan, planned once per
connection. Planned on a payments table that was never analyzed (a fresh branch
database: the first pays after migrating, until the first autoanalyze), PostgreSQL
chose ix_payments_bank_day with bank_serial as a mere filter, walking every payment
of the bank on every pay: under bench-ratio 57-61 heap blocks per pay and 0.3 ms
more server CPU per pay, in about half the runs. With no other index led by
bank_id, the plan is the unique (bank_id, bank_serial) key whatever the statistics
(EXPLAIN, tests/mis_adapter/test_payments_indexes.py). One index entry less per pay.

Readers: reconciliation and control totals name the bank and the day (equality on
both columns), the day close and reports the day or a range of days, with or without
the bank: (settlement_date, bank_id) serves each. A bank's payments by serial are
the unique key's.

Revision ID: 0004_payments_day_bank
Revises: 0003
"""
from alembic import op

revision = '0004_payments_day_bank'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.create_index('ix_payments_day_bank', ['settlement_date', 'bank_id'], unique=False)
        batch_op.drop_index('ix_payments_bank_day')
        batch_op.drop_index('ix_payments_day')


def downgrade() -> None:
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.create_index('ix_payments_bank_day', ['bank_id', 'settlement_date'], unique=False)
        batch_op.create_index('ix_payments_day', ['settlement_date'], unique=False)
        batch_op.drop_index('ix_payments_day_bank')
