"""`python -m mis_adapter bank list|suspend|resume|refund-mode`: the operator's
停工/开工 and each bank's refund configuration.

- suspend / resume: while suspended, a bank's money-moving requests get
  UNAVAILABLE saying so, whatever its link state (signed on or not); queries
  still answer. Servers pick the change up within bank_status_ttl_s.
- refund-mode BANK prepaid|refund: what happens to an auto-debit that met a
  bill already settled elsewhere: kept as the account's prepaid credit
  (prepaid, the default) or offered back to the bank (refund: ListRefunds /
  AcknowledgeRefunds). Applies to over-debits listed from now on. With branch
  databases give them (`--branch-db CODE=URL`, as to `serve`): each gets the
  mode at once; otherwise a branch database learns it at the bank's next
  sign-on or sign-off, or when `serve` starts.
- list: every bank with its suspension, link state (签到/签退) and refund mode."""
from __future__ import annotations

import argparse
import datetime as dt

from mis_adapter import link_state
from mis_adapter.banks import set_suspended
from mis_adapter.routing import BranchRouter
from yindian_common import fields
from yindian_common.clock import business_date, make_clock, utc_now
from yindian_common.db import make_engine
from yindian_common.errors import Forbidden


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mis_adapter bank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["list", "suspend", "resume", "refund-mode"])
    p.add_argument("bank_id", nargs="?", default="")
    p.add_argument("mode", nargs="?", default="", help="refund-mode only: prepaid or refund")
    p.add_argument("--db", required=True, help="SQLAlchemy URL of the MIS (primary) database")
    p.add_argument("--branch-db", action="append", default=[], metavar="CODE=URL",
                   help="refund-mode: a branch database to copy the mode to at once (repeatable)")
    p.add_argument("--reason", default="", help="why (shown to the bank), at most 128 characters")
    p.add_argument("--timezone", default="Asia/Shanghai", help="the utility's time zone: business dates")
    args = p.parse_args(argv)
    engine = make_engine(args.db, pool_size=1)
    try:
        if args.action == "list":
            for v in link_state.link_states(engine):
                name = v.bank_id
                state = "SUSPENDED" if v.suspended else "ACTIVE"
                day = v.business_date.isoformat() if v.business_date else "-"
                print(f"{name:<8} {state:<10} link={v.state:<10} since={day:<10} refunds={v.refund_mode}")
            return 0
        if not args.bank_id:
            p.error("bank_id is required")
        if args.action == "refund-mode":
            if args.mode.lower() not in ("prepaid", "refund"):
                p.error("refund-mode needs prepaid or refund")
            clock = make_clock(None, args.timezone)
            try:
                v = link_state.set_refund_mode(engine, args.bank_id, args.mode.upper(), business_date(clock),
                                               utc_now(clock))
            except Forbidden:
                print(f"no such bank: {args.bank_id}")
                return 1
            if args.branch_db:
                router = BranchRouter.from_specs(args.db, args.branch_db, pool_size=1)
                try:
                    for branch in router.engines()[1:]:
                        link_state.mirror(branch, v)
                finally:
                    router.dispose()
            print(f"{args.bank_id} refund mode {v.refund_mode}")
            return 0
        fields.text(args.reason, "reason", fields.REASON_MAX)
        now = dt.datetime.now(dt.UTC)
        if not set_suspended(engine, args.bank_id, args.action == "suspend", args.reason, now):
            print(f"no such bank: {args.bank_id}")
            return 1
        print(f"{args.bank_id} {'suspended' if args.action == 'suspend' else 'resumed'}")
        return 0
    finally:
        engine.dispose()
