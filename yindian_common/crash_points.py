"""Named crash points for the exactly-once tests: a process started with
the test setting `crash_point` (flag `--crash-point`, environment
`YINDIAN_CRASH_POINT`; read once into the process's settings and armed in
main) kills itself with SIGKILL when it reaches the named point: no drain,
no flush, no finally blocks, as a power cut would. Unarmed (always, outside
tests) a point costs one truth test of an empty set.

The points (one call each, at the place the name says):

- bridge.after_journal   the request is journaled, not yet forwarded
- bridge.after_answer    mis_adapter answered; the outcome is not yet journaled
- bridge.after_reply     the bank core got its answer
- mis.before_commit      a pay is computed and nothing of it is committed (PostgreSQL's one-trip pay: not yet sent)
- mis.after_commit       a pay committed; the answer is not yet sent
- mis.recon_mid_apply    a reconciliation matched the day and is applying its outcomes
- mis.feed_after_post    a feed result batch is posted, the cursor not yet moved
- mis.registry_after_claim          branch topology: the front registry holds the
                                    serial's claim, the branch has not posted
- mis.registry_after_branch_commit  the branch committed the pay, the claim is not yet marked
- bank.after_debit       bank_sim debited the passbooks, the results not yet sent

Never armed in production: the setting's description says so, and it is
empty by default."""
from __future__ import annotations

import os
import signal

NAMES = frozenset({
    "bridge.after_journal", "bridge.after_answer", "bridge.after_reply",
    "mis.before_commit", "mis.after_commit", "mis.recon_mid_apply", "mis.feed_after_post",
    "mis.registry_after_claim", "mis.registry_after_branch_commit",
    "bank.after_debit",
})

_armed: frozenset[str] = frozenset()


def arm(spec: str) -> None:
    """Arms the comma-separated points of `spec` (the process's crash_point setting)."""
    global _armed
    names = frozenset(n.strip() for n in spec.split(",") if n.strip())
    unknown = names - NAMES
    if unknown:
        raise ValueError(f"unknown crash point(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(NAMES))}")
    _armed = names


def armed(name: str) -> bool:
    return bool(_armed) and name in _armed


def crash_point(name: str) -> None:
    if _armed and name in _armed:
        os.kill(os.getpid(), signal.SIGKILL)
