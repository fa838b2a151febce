"""The tamper-evident chain over the MIS journal (yindian_common.audit_chain):
`journal_seals`, one seal per journal entry, appended by the sealer."""
from __future__ import annotations

from mis_adapter.db.base import Base
from mis_adapter.db.core import JournalEntry
from yindian_common.audit_chain import Chain, seals_table

journal_seals = seals_table(Base.metadata, "journal_seals")
JOURNAL_CHAIN = Chain(JournalEntry.__table__, "entry_id", journal_seals)  # type: ignore[arg-type]
