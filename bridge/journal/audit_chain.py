"""The tamper-evident chain over the bridge's append-only audit lines
(`bridge_audit`): `bridge_audit_seals`, appended by the bridge's sealer
(yindian_common.audit_chain)."""
from __future__ import annotations

from bridge.journal.schema import audit, metadata
from yindian_common.audit_chain import Chain, seals_table

audit_seals = seals_table(metadata, "bridge_audit_seals")
AUDIT_CHAIN = Chain(audit, "audit_id", audit_seals)
