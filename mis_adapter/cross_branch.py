"""Pay, Cancel and GetPayment across branch databases: each bank's one serial
space, kept by the front registry (mis_adapter.registry), with the money
transactions themselves unchanged in the serial's home branch
(mis_adapter.payments: pay_in, cancel_in, status_in).

    Pay        claim (bank, serial) -> home = the account's branch
               -> pay transaction in home (replay if it holds the serial) -> settle
    Cancel     claim the cancel serial; claim the original (a tombstone in the
               primary database when nobody had) or settle its claim -> cancel in
               the original's home (reverse, replay, or tombstone there)
    GetPayment the claim's home says; no claim: NOT_FOUND

Races: the first claim decides the serial's home; in that home the branch's
unique key (bank, serial) and account locks order pay, replay, cancel and
cancel-before-pay exactly as with one database. A pay claimed on one branch
and replayed on another account answers ALREADY_EXISTS; a pay whose serial a
cancel claimed first is refused (FAILED_PRECONDITION), as a tombstone is.

Crashes: the crash points mis.registry_after_claim and mis.registry_after_branch_commit (tests only).
Killed after the claim, nothing is in the branch and the retry posts; killed
after the branch commit, the retry replays and settles. Claims nobody will
settle are settled or released by mis_adapter.claim_recovery (at start,
periodically, and by the operator)."""
from __future__ import annotations

import logging
from typing import Any

from mis_adapter import payments, registry
from mis_adapter.payments import CancelCommand, CancelResult, PayCommand, PaymentStatus, PayResult
from mis_adapter.registry import Claim
from yindian_common import crash_points
from yindian_common.clock import utc_now
from yindian_common.db import WaitBound
from yindian_common.errors import (
    AccountClosed,
    AccountNotFound,
    DayClosed,
    Precondition,
    SerialConflict,
    SerialReversed,
    Unavailable,
)

log = logging.getLogger("mis_adapter.cross_branch")

AFTER_CLAIM = "mis.registry_after_claim"
AFTER_BRANCH_COMMIT = "mis.registry_after_branch_commit"

# The branch refused the pay outright and wrote nothing: the claim is released.
_NOTHING_WRITTEN = (AccountNotFound, AccountClosed, DayClosed)
# The branch holds the serial (a replay that differs, a reversal, a tombstone): the claim stays.
_HELD = (SerialConflict, SerialReversed)


def crash_point(ctx: Any, name: str) -> None:
    """Tests only: die like kill -9 at this point when the process's crash_point
    setting arms it (yindian_common.crash_points); logged first so a test can
    see that the process died where it meant to."""
    if crash_points.armed(name):
        log.warning("event=crash_point name=%s", name)
        crash_points.crash_point(name)


def _front(ctx: Any) -> Any:
    front = ctx.router.front
    if front is None:
        raise RuntimeError("cross_branch used without a front database")
    return front


# ---- Pay ----
def pay(ctx: Any, cmd: PayCommand, wait: WaitBound | None = None) -> tuple[PayResult, bool]:
    """(result, True) when this call posted it, (stored result, False) for a replay. `wait`: the
    call's database wait bound for the branch transaction (None: the configured maximum), as with
    one database."""
    front = _front(ctx)
    want = Claim(cmd.bank_id, cmd.bank_serial, registry.PAY, cmd.account_no[:2], cmd.account_no, cmd.amount_fen,
                 registry.CLAIMED)
    claim, _fresh = registry.claim(front, want, utc_now(ctx.clock))
    if claim.kind == registry.TOMBSTONE:
        raise SerialReversed(f"bank_serial {cmd.bank_serial} was cancelled before it arrived; pay refused")
    if claim.account_no != cmd.account_no or claim.amount_fen != cmd.amount_fen:
        raise SerialConflict(f"bank_serial {cmd.bank_serial} was used with different parameters")
    crash_point(ctx, AFTER_CLAIM)
    engine = ctx.router.engine_for_branch(claim.home)
    try:
        result, fresh = payments.pay_in(ctx, engine, cmd, wait)
    except _NOTHING_WRITTEN:
        if claim.state == registry.CLAIMED:
            registry.release(front, cmd.bank_id, cmd.bank_serial)
        raise
    except _HELD:
        _settle(ctx, claim)
        raise
    crash_point(ctx, AFTER_BRANCH_COMMIT)
    _settle(ctx, claim)
    return result, fresh


def _settle(ctx: Any, claim: Claim) -> None:
    """After the branch answered with the serial held: the mark need not be durable (registry.settle)."""
    if claim.state != registry.SETTLED:
        registry.settle(_front(ctx), claim.bank_id, claim.serial, utc_now(ctx.clock), durable=False)


# ---- GetPayment ----
def get_payment(ctx: Any, bank_id: str, bank_serial: str) -> PaymentStatus:
    claim = registry.lookup(_front(ctx), bank_id, bank_serial)
    if claim is None:
        return PaymentStatus("NOT_FOUND", None)
    found = payments.status_in(ctx.router.engine_for_branch(claim.home), bank_id, bank_serial)
    return found or PaymentStatus("NOT_FOUND", None)  # claimed, nothing posted: nothing written


# ---- Cancel ----
def cancel(ctx: Any, cmd: CancelCommand, wait: WaitBound | None = None) -> tuple[CancelResult, bool]:
    """(result, True) when this call applied the cancel, (stored result, False) for a replay.
    IntegrityError (from the home branch) when its pay committed meanwhile: the caller retries.
    `wait`: the call's database wait bound for the branch transaction (None: the configured maximum)."""
    front = _front(ctx)
    now = utc_now(ctx.clock)
    earlier = registry.claim_cancel(front, registry.CancelClaim(cmd.bank_id, cmd.cancel_serial, cmd.original_serial,
                                                                cmd.amount_fen), now)
    if earlier is not None and (earlier.original_serial != cmd.original_serial
                                or earlier.amount_fen != cmd.amount_fen):
        raise SerialConflict(f"cancel_serial {cmd.cancel_serial} was used with different parameters")
    home = _pin_original(ctx, cmd)
    try:
        return payments.cancel_in(ctx, ctx.router.engine_for_branch(home), cmd, wait)
    except (Precondition, SerialConflict):
        if earlier is None:  # refused, nothing written: the cancel serial stays free
            registry.release_cancel(front, cmd.bank_id, cmd.cancel_serial)
        raise


def _pin_original(ctx: Any, cmd: CancelCommand) -> str:
    """The original's home, its claim SETTLED first so that no release can move it.
    Nobody claimed it: it is claimed now as a tombstone in the primary database."""
    front = _front(ctx)
    want = Claim(cmd.bank_id, cmd.original_serial, registry.TOMBSTONE, registry.PRIMARY_HOME, "", cmd.amount_fen,
                 registry.SETTLED)
    for _attempt in range(registry.CLAIM_ATTEMPTS_MAX):
        claim, fresh = registry.claim(front, want, utc_now(ctx.clock))
        if fresh or claim.state == registry.SETTLED or registry.settle(front, cmd.bank_id, cmd.original_serial,
                                                                       utc_now(ctx.clock)):
            return claim.home
        # its pay released the claim meanwhile (refused outright): claim again
    raise Unavailable("the cancel kept racing its payment's claim; retry the same cancel_serial", reason="RETRY")
