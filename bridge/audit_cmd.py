"""`python -m bridge audit verify|seal --db URL`: the tamper-evident chain
over the bridge's audit lines (yindian_common.audit_chain). `verify` is
read only and exits 1 naming every edited, deleted or reordered line and
every removed or edited seal; `seal` appends seals (one per batch of
lines) for lines not yet sealed."""
from __future__ import annotations

import argparse
import datetime as dt

from bridge.journal.audit_chain import AUDIT_CHAIN
from yindian_common.db import make_engine


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge audit", description=__doc__)
    parser.add_argument("action", choices=["verify", "seal"])
    parser.add_argument("--db", required=True, help="the bridge's journal database URL")
    args = parser.parse_args(argv)
    engine = make_engine(args.db, pool_size=1)
    try:
        if args.action == "seal":
            total = 0
            while n := AUDIT_CHAIN.seal_pending(engine, dt.datetime.now(dt.UTC)):
                total += n
            print(f"sealed {total} audit lines")
            return 0
        with engine.connect() as conn:
            checked, problems, unsealed = AUDIT_CHAIN.verify(conn)
    finally:
        engine.dispose()
    for p in problems:
        print(f"TAMPERED: {p}")
    print(f"bridge audit chain: {checked} sealed entries checked, {len(problems)} problems, {unsealed} not yet sealed")
    return 1 if problems else 0
