"""`python -m mis_adapter audit verify|seal --db URL`: the tamper-evident
chain over the MIS journal (yindian_common.audit_chain). `verify` is read
only: it walks the seals and exits 1 naming every edited, deleted or
reordered entry and every removed or edited seal; `seal` appends seals
(one per batch of entries) for entries not yet sealed (the server's
sealer does this every few seconds)."""
from __future__ import annotations

import argparse
import datetime as dt

from mis_adapter.db.audit import JOURNAL_CHAIN
from yindian_common.db import make_engine


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mis_adapter audit", description=__doc__)
    parser.add_argument("action", choices=["verify", "seal"])
    parser.add_argument("--db", required=True, help="the MIS database URL (each branch database separately)")
    args = parser.parse_args(argv)
    engine = make_engine(args.db, pool_size=1)
    try:
        if args.action == "seal":
            total = 0
            while n := JOURNAL_CHAIN.seal_pending(engine, dt.datetime.now(dt.UTC)):
                total += n
            print(f"sealed {total} journal entries")
            return 0
        with engine.connect() as conn:
            checked, problems, unsealed = JOURNAL_CHAIN.verify(conn)
    finally:
        engine.dispose()
    for p in problems:
        print(f"TAMPERED: {p}")
    print(f"journal chain: {checked} sealed entries checked, {len(problems)} problems, {unsealed} not yet sealed")
    return 1 if problems else 0
