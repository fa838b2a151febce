"""The journal's kinds, states and bounds, and its tables (migrated by
bridge/migrations: revision 0001 creates the journal and its audit, 0003_link_journal the
append-only journal of the link's other transactions, bridge.link_journal)."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

PAY = "PAY"
CANCEL = "CANCEL"

PENDING = "PENDING"
POSTED = "POSTED"
CANCELLED = "CANCELLED"
FAILED = "FAILED"
RETRYABLE = "RETRYABLE"
SUSPECT = "SUSPECT"
REVERSING = "REVERSING"
NOT_APPLIED = "NOT_APPLIED"

DEFINITE_STATES = frozenset({POSTED, CANCELLED, FAILED, NOT_APPLIED})
IN_DOUBT_STATES = frozenset({PENDING, SUSPECT, REVERSING})

# The states a reader looks rows up by (every query on `state` asks for some of these): on PostgreSQL
# only rows in them are in ix_bridge_journal_state_due, so a pay's outcome (POSTED, FAILED, ...) adds
# no entry there (revision 0005_journal_lean_indexes). Queries name them as literals (`in_states`) so
# that a prepared statement's generic plan can still prove the index's predicate.
OPEN_STATES = (PENDING, RETRYABLE, REVERSING, SUSPECT)
OPEN_STATES_SQL = ", ".join(f"'{s}'" for s in OPEN_STATES)

# PostgreSQL: a journal page keeps half its room for its rows' outcomes, so that each outcome's new
# version lands on its row's page (revision 0007_pgcpu_journal_room).
JOURNAL_FILLFACTOR = 50

MESSAGE_MAX = 256
WRITER_BACKOFF_CAP_S = 5.0

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TZ = sa.DateTime(timezone=True)

metadata = sa.MetaData()

requests = sa.Table(
    "bridge_journal", metadata,
    sa.Column("kind", sa.String(6), primary_key=True),
    sa.Column("serial", sa.String(32), primary_key=True),
    sa.Column("bank_id", sa.String(16), nullable=False),
    sa.Column("account_no", sa.String(10), nullable=False, default=""),
    sa.Column("original_serial", sa.String(32), nullable=False, default=""),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    sa.Column("outlet_code", sa.String(16), nullable=False, default=""),
    sa.Column("teller_id", sa.String(16), nullable=False, default=""),
    sa.Column("channel", sa.Integer, nullable=False, default=0),
    sa.Column("bank_balance_fen", sa.BigInteger, nullable=True),
    sa.Column("reason", sa.String(128), nullable=False, default=""),
    # who sent it: the bank core's certificate identity, or its x-yindian-bank-id (revision 0002_journal_caller)
    sa.Column("caller", sa.String(16), nullable=False, default="", server_default=""),
    sa.Column("state", sa.String(12), nullable=False),
    # gRPC status code of the definite answer (0 = OK)
    sa.Column("status_code", sa.Integer, nullable=True),
    # PayResponse / CancelResponse bytes when OK, google.rpc.Status bytes when FAILED
    sa.Column("body", sa.LargeBinary, nullable=True),
    sa.Column("message", sa.String(MESSAGE_MAX), nullable=False, default=""),
    sa.Column("reversal_serial", sa.String(32), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    # epoch milliseconds: compared the same way on every back end
    sa.Column("next_attempt_ms", sa.BigInteger, nullable=False, default=0),
    sa.Column("business_date", sa.Date, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    sa.Index("ix_bridge_journal_state_due", "state", "next_attempt_ms",
             postgresql_where=sa.text(f"state IN ({OPEN_STATES_SQL})")),
    sa.Index("ix_bridge_journal_original", "original_serial", postgresql_where=sa.text("kind = 'CANCEL'")),
    postgresql_with={"fillfactor": JOURNAL_FILLFACTOR},
)


def in_states(*states: str) -> sa.ColumnElement[bool]:
    """`state IN (...)` with the states as SQL literals (see OPEN_STATES), never bound parameters."""
    unknown = set(states) - set(OPEN_STATES)
    if unknown:
        raise ValueError(f"not an indexed state: {sorted(unknown)}")
    return requests.c.state.in_([sa.literal_column(f"'{s}'") for s in states])


def kind_is(kind: str) -> sa.ColumnElement[bool]:
    """`kind = '...'` as an SQL literal (ix_bridge_journal_original's predicate names CANCEL)."""
    if kind not in (PAY, CANCEL):
        raise ValueError(f"not a journal kind: {kind!r}")
    return requests.c.kind == sa.literal_column(f"'{kind}'")

audit = sa.Table(
    "bridge_audit", metadata,
    sa.Column("audit_id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", TZ, nullable=False),
    sa.Column("kind", sa.String(6), nullable=False),
    sa.Column("serial", sa.String(32), nullable=False),
    sa.Column("bank_id", sa.String(16), nullable=False),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(12), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("detail", sa.String(MESSAGE_MAX), nullable=False, default=""),
    # No index but the key: nothing in the product reads the audit by serial (revision 0008_journalpg_audit_lean).
)

COLUMNS = [c.name for c in requests.columns]


def utc(value: dt.datetime) -> dt.datetime:
    """Instants are stored in UTC (SQLite and MariaDB keep only the wall time)."""
    return value.astimezone(dt.UTC)


# Agreements, refund acknowledgements, sign-on/off (bridge.link_journal): append-only, one line before the
# request crosses the link (REQUESTED) and one after (ANSWERED).
LINK_DETAIL_MAX = 256
link_lines = sa.Table(
    "bridge_link_journal", metadata,
    sa.Column("line_id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", TZ, nullable=False),
    sa.Column("bank_id", sa.String(16), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("serial", sa.String(32), nullable=False),
    sa.Column("account_no", sa.String(10), nullable=False),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    sa.Column("phase", sa.String(10), nullable=False),
    # OK, the utility's status code name, or IN_DOUBT (ANSWERED lines only)
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("detail", sa.String(LINK_DETAIL_MAX), nullable=False),
    sa.Index("ix_bridge_link_journal_serial", "kind", "serial"),
)
