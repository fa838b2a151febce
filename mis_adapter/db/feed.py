"""Bill feed tables (outbox, per-bank sequence counters, cursors, leases).
Owned by the bill-feed work; see mis_adapter/feed*."""
