"""The tamper-evident chain over the bridge's append-only audit lines
(`bridge_audit`): `bridge_audit_seal_batches`, one seal per batch of lines,
appended by the bridge's sealer (yindian_common.audit_chain);
`bridge_audit_seals`, one seal per line, the chain as sealed before batch
seals (read by verify, no longer appended to)."""
from __future__ import annotations

from bridge.journal.schema import audit, metadata
from yindian_common.audit_chain import Chain, batch_seals_table, seals_table

audit_seals = seals_table(metadata, "bridge_audit_seals")
audit_seal_batches = batch_seals_table(metadata, "bridge_audit_seal_batches")
AUDIT_CHAIN = Chain(audit, "audit_id", audit_seals, audit_seal_batches)
