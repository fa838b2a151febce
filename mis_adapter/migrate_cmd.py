"""`python -m mis_adapter migrate`: upgrade every branch database to the current schema."""
from __future__ import annotations

import argparse

from mis_adapter.migrate import upgrade
from mis_adapter.routing import BranchRouter


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mis_adapter migrate", description=__doc__)
    p.add_argument("--db", required=True, help="SQLAlchemy URL of the MIS database")
    p.add_argument("--branch-db", action="append", default=[], help="CODE=URL (repeatable)")
    p.add_argument("--front-db", default="", help="front database URL (serial registry); default: --db")
    args = p.parse_args(argv)
    router = BranchRouter.from_specs(args.db, args.branch_db, front_url=args.front_db)
    for engine in router.all_engines():
        upgrade(engine)
        print(f"upgraded {engine.url.render_as_string(hide_password=True)}")
    router.dispose()
    return 0
