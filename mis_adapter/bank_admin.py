"""`python -m mis_adapter bank list|suspend|resume`: the operator's 停工/开工.
While suspended, a bank's money-moving requests get UNAVAILABLE saying so;
queries still answer. Servers pick the change up within bank_status_ttl_s."""
from __future__ import annotations

import argparse
import datetime as dt

import sqlalchemy as sa

from mis_adapter.banks import T_BANKS, set_suspended
from yindian_common import fields
from yindian_common.db import make_engine


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mis_adapter bank", description=__doc__)
    p.add_argument("action", choices=["list", "suspend", "resume"])
    p.add_argument("bank_id", nargs="?", default="")
    p.add_argument("--db", required=True, help="SQLAlchemy URL of the MIS (primary) database")
    p.add_argument("--reason", default="", help="why (shown to the bank), at most 128 characters")
    args = p.parse_args(argv)
    engine = make_engine(args.db, pool_size=1)
    try:
        if args.action == "list":
            with engine.connect() as conn:
                for r in conn.execute(sa.select(T_BANKS).order_by(T_BANKS.c.bank_id)):
                    state = f"SUSPENDED ({r.suspended_reason})" if r.suspended else "ACTIVE"
                    print(f"{r.bank_id:<8} {r.name:<32} {state}")
            return 0
        if not args.bank_id:
            p.error("bank_id is required")
        fields.text(args.reason, "reason", fields.REASON_MAX)
        now = dt.datetime.now(dt.UTC)
        if not set_suspended(engine, args.bank_id, args.action == "suspend", args.reason, now):
            print(f"no such bank: {args.bank_id}")
            return 1
        print(f"{args.bank_id} {'suspended' if args.action == 'suspend' else 'resumed'}")
        return 0
    finally:
        engine.dispose()
