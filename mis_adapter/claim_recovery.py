"""Settling the front registry's open claims (mis_adapter.registry) that no
Pay will settle: the process that made them died, or a reconciliation that
claimed its BANK_ONLY serials was refused. One pass looks in each claim's
home branch:

- the branch holds the serial (payment, reversal or tombstone): the claim
  is marked SETTLED, as the Pay would have done after its branch commit;
- the branch does not hold it and the claim is older than
  `registry_claim_expiry_s` (longer than any Pay can take: its deadline,
  database waits and retries are all bounded far below): nothing was
  written and nothing will be, so the claim is released and the serial is
  free again, exactly as if the Pay had never reached the MIS;
- otherwise the claim is young (a Pay may be in flight) and stays.

A release re-reads the branch after deleting: a Pay that committed in that
instant (it would have had to outlive every bound) gets its claim back as
SETTLED, and a serial some other branch claimed meanwhile is logged loudly.

Runs at start (`serve`), every `registry_recover_interval_s` in `serve`
(`ClaimRecovery`), and by the operator (`python -m mis_adapter registry
recover`). Must never release a claim whose branch holds the serial."""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import threading
from dataclasses import dataclass

import sqlalchemy as sa

from mis_adapter import payments, registry
from mis_adapter.migrate import upgrade
from mis_adapter.registry import Claim
from mis_adapter.routing import BranchRouter
from mis_adapter.settings import AdapterSettings
from yindian_common.clock import Clock, make_clock, utc_now
from yindian_common.settings import load_settings

log = logging.getLogger("mis_adapter.claim_recovery")


@dataclass(frozen=True)
class RecoveryReport:
    settled: int    # the branch held the serial: marked SETTLED
    released: int   # nothing in the branch, older than the expiry: released
    open: int       # young claims left for their Pay (or a later pass)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)  # SQLite and MariaDB keep UTC without a zone


def recover(router: BranchRouter, clock: Clock, *, batch_max: int, expiry_s: float) -> RecoveryReport:
    """One pass over at most `batch_max` open claims, oldest first."""
    front = router.front
    if front is None:
        return RecoveryReport(0, 0, 0)
    now = utc_now(clock)
    expired_before = now - dt.timedelta(seconds=expiry_s)
    settled = released = still_open = 0
    for c, claimed_at in registry.open_claims_with_age(front, batch_max):
        engine = router.engine_for_branch(c.home)
        if payments.status_in(engine, c.bank_id, c.serial) is not None:
            registry.settle(front, c.bank_id, c.serial, now)
            settled += 1
        elif _aware(claimed_at) < expired_before:
            _release(router, c, now)
            released += 1
        else:
            still_open += 1
    log.info("event=registry_recovered settled=%d released=%d open=%d", settled, released, still_open)
    return RecoveryReport(settled, released, still_open)


def _release(router: BranchRouter, c: Claim, now: dt.datetime) -> None:
    front = router.front
    assert front is not None  # checked by recover
    registry.release(front, c.bank_id, c.serial)
    log.warning("event=registry_claim_released bank=%s serial=%s home=%s reason=nothing_posted_before_expiry",
                c.bank_id, c.serial, c.home or "primary")
    if payments.status_in(router.engine_for_branch(c.home), c.bank_id, c.serial) is None:
        return
    back = Claim(c.bank_id, c.serial, c.kind, c.home, c.account_no, c.amount_fen, registry.SETTLED)
    held, fresh = registry.claim(front, back, now)
    if not fresh and held.home != c.home:
        log.error("event=registry_serial_in_two_branches bank=%s serial=%s homes=%s,%s",
                  c.bank_id, c.serial, c.home, held.home)


class ClaimRecovery:
    """`serve`'s background pass every interval_s (a database error is logged and retried at the next)."""

    def __init__(self, router: BranchRouter, clock: Clock, settings: AdapterSettings) -> None:
        self._router, self._clock, self._settings = router, clock, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-recovery", daemon=True)

    def run_once(self) -> RecoveryReport:
        return recover(self._router, self._clock, batch_max=self._settings.registry_recover_batch_max,
                       expiry_s=self._settings.registry_claim_expiry_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._settings.db_wait_max_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self._settings.registry_recover_interval_s):
            try:
                self.run_once()
            except sa.exc.SQLAlchemyError as exc:
                log.warning("event=registry_recovery_failed error=%s", type(exc).__name__)


def main(argv: list[str]) -> int:
    """`python -m mis_adapter registry recover|backfill`: one recovery pass, or the backfill after a
    split (mis_adapter.registry_backfill), by the operator. Exit 1: backfill found conflicting serials."""
    p = argparse.ArgumentParser(prog="python -m mis_adapter registry", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["recover", "backfill"],
                   help="recover: settle or release open claims; backfill: load the serials the databases "
                        "already hold (once, after splitting one database)")
    p.add_argument("--db", required=True, help="SQLAlchemy URL of the primary MIS database")
    p.add_argument("--branch-db", action="append", default=[], help="CODE=URL (repeatable), as `serve` has them")
    p.add_argument("--front-db", default="", help="the front database (default: --db), as `serve` has it")
    p.add_argument("--claim-expiry-s", type=float, default=None,
                   help="release open claims with nothing in their branch older than this (default: the setting)")
    p.add_argument("--clock-start", default="", help="run the clock from this ISO instant (tests, demos)")
    args = p.parse_args(argv)
    overrides: dict[str, object] = {"db": args.db, "branch_db": args.branch_db, "front_db": args.front_db}
    if args.claim_expiry_s is not None:
        overrides["registry_claim_expiry_s"] = args.claim_expiry_s
    settings = load_settings(AdapterSettings, overrides)
    router = BranchRouter.from_specs(settings.db, settings.branch_db, front_url=settings.front_db)
    try:
        for engine in router.all_engines():
            upgrade(engine)  # the front database's registry tables, on a first run after the split
        if router.front is None:
            print("one database: its own unique keys keep serials unique; there is no registry to recover")
            return 0
        clock = make_clock(args.clock_start or None, settings.timezone)
        if args.action == "backfill":
            return _backfill(router, clock)
        r = recover(router, clock, batch_max=settings.registry_recover_batch_max,
                    expiry_s=settings.registry_claim_expiry_s)
        print(f"registry recovered: settled={r.settled} released={r.released} open={r.open}")
        return 0
    finally:
        router.dispose()


def _backfill(router: BranchRouter, clock: Clock) -> int:
    from mis_adapter.registry_backfill import backfill

    b = backfill(router, utc_now(clock))
    print(f"registry backfilled: serials={b.serials} cancels={b.cancels} conflicts={b.conflicts}")
    for line in b.shown:
        print(f"  conflict: {line}")
    return 1 if b.conflicts else 0
