"""The tamper-evident chain over the MIS journal (yindian_common.audit_chain):
`journal_seal_batches`, one seal per batch of journal entries, appended by
the sealer; `journal_seals`, one seal per entry, the chain as sealed before
batch seals (read by verify, no longer appended to)."""
from __future__ import annotations

from mis_adapter.db.base import Base
from mis_adapter.db.core import JournalEntry
from yindian_common.audit_chain import Chain, batch_seals_table, seals_table

journal_seals = seals_table(Base.metadata, "journal_seals")
journal_seal_batches = batch_seals_table(Base.metadata, "journal_seal_batches")
JOURNAL_CHAIN = Chain(JournalEntry.__table__, "entry_id", journal_seals,  # type: ignore[arg-type]
                      journal_seal_batches)
