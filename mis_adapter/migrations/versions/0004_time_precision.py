"""payment times to the microsecond on MariaDB/MySQL

A DATETIME column without a fractional part keeps whole seconds: a counter
payment's time (posted_at) and the times of reversals, cancels, the journal
and the prepaid ledger were cut to the second there, while PostgreSQL and
SQLite keep microseconds. DATETIME(6) stores the instant the clock gave.

Revision ID: 0004_time_precision
Revises: 0003
"""
from alembic import op
from sqlalchemy.dialects import mysql

revision = '0004_time_precision'
down_revision = '0003'
branch_labels = None
depends_on = None

# (table, column, nullable)
COLUMNS = [('payments', 'posted_at', False), ('payments', 'reversed_at', True), ('cancels', 'created_at', False),
           ('journal', 'at', False), ('prepaid_ledger', 'at', False)]


def upgrade() -> None:
    if op.get_bind().dialect.name != 'mysql':
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=mysql.DATETIME(fsp=6), existing_type=mysql.DATETIME(),
                        existing_nullable=nullable)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'mysql':
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=mysql.DATETIME(), existing_type=mysql.DATETIME(fsp=6),
                        existing_nullable=nullable)
