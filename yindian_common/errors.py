"""Expected failures: the one tree of domain exceptions, each with the gRPC
status name it maps to at the edge (yindian_common.status.guard) and a
stable UPPER_SNAKE reason. Every expected refusal of YinDian is a class here.

    YinDianError
    ├── InvalidField            INVALID_ARGUMENT  (names the field)
    ├── FileRejected            INVALID_ARGUMENT  (a reconciliation file; lists its problems)
    ├── AccountNotFound         NOT_FOUND
    ├── AgreementNotFound       NOT_FOUND  (no active agreement of the caller's; another bank's looks the same)
    ├── SerialConflict          ALREADY_EXISTS
    ├── Precondition            FAILED_PRECONDITION
    │   ├── DayClosed
    │   ├── SerialReversed
    │   ├── AccountClosed
    │   ├── AgreementActive     (the account already has an active auto-debit agreement)
    │   └── FeedMultiDatabase   (the bill feed needs all branches in one database)
    ├── Forbidden               PERMISSION_DENIED
    ├── Unauthenticated         UNAUTHENTICATED
    ├── Exhausted               RESOURCE_EXHAUSTED
    ├── Unavailable             UNAVAILABLE
    │   └── BankSuspended
    ├── Aborted                 ABORTED
    │   ├── InFlight            (a duplicate whose original is still being applied)
    │   └── FeedBusy            (a second subscriber to a bank's bill feed)
    ├── PeerSilent              DEADLINE_EXCEEDED (a bill-feed peer sent no results in time)
    └── ReconPeerSilent         DEADLINE_EXCEEDED (a bank silent mid-Reconcile: nothing of the day applied)

Bugs are outside the tree: a broken invariant raises a `Bug`, which no edge
maps to a status; it ends the call loudly (logged with its traceback).

    Bug (AssertionError)
    └── AllocationInvariantBroken

Anything else raised on a request path is a bug too and is not caught."""
from __future__ import annotations


class YinDianError(Exception):
    code = "INTERNAL"
    reason = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if reason is not None:
            self.reason = reason


class InvalidField(YinDianError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_FIELD"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)


class FileRejected(YinDianError):
    """A reconciliation file refused as a whole: nothing of it was applied."""
    code = "INVALID_ARGUMENT"
    reason = "FILE_REJECTED"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class AccountNotFound(YinDianError):
    code = "NOT_FOUND"
    reason = "ACCOUNT_NOT_FOUND"


class AgreementNotFound(YinDianError):
    code = "NOT_FOUND"
    reason = "AGREEMENT_NOT_FOUND"


class SerialConflict(YinDianError):
    code = "ALREADY_EXISTS"
    reason = "SERIAL_REUSED"


class Precondition(YinDianError):
    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class DayClosed(Precondition):
    reason = "DAY_RECONCILED"


class SerialReversed(Precondition):
    reason = "SERIAL_REVERSED"


class AccountClosed(Precondition):
    reason = "ACCOUNT_CLOSED"


class AgreementActive(Precondition):
    reason = "AGREEMENT_ACTIVE"


class FeedMultiDatabase(Precondition):
    reason = "FEED_SINGLE_DATABASE_ONLY"


class Forbidden(YinDianError):
    code = "PERMISSION_DENIED"
    reason = "OTHER_BANK"


class Unauthenticated(YinDianError):
    code = "UNAUTHENTICATED"
    reason = "NO_BANK_IDENTITY"


class Exhausted(YinDianError):
    code = "RESOURCE_EXHAUSTED"
    reason = "BANK_LIMIT"


class Unavailable(YinDianError):
    code = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class BankSuspended(Unavailable):
    reason = "BANK_SUSPENDED"


class Aborted(YinDianError):
    code = "ABORTED"
    reason = "ABORTED"


class InFlight(Aborted):
    reason = "DUPLICATE_IN_FLIGHT"


class FeedBusy(Aborted):
    """A second subscriber while the bank's stream is active: refused."""
    reason = "FEED_ALREADY_ACTIVE"


class PeerSilent(YinDianError):
    code = "DEADLINE_EXCEEDED"
    reason = "FEED_PEER_SILENT"


class ReconPeerSilent(YinDianError):
    """A Reconcile stream whose bank sent nothing for too long: ended, nothing applied."""
    code = "DEADLINE_EXCEEDED"
    reason = "RECON_PEER_SILENT"


# ---- bugs: outside the tree, never mapped to a status ----

class Bug(AssertionError):
    """A broken invariant of our own code. Never caught on a request path."""


class AllocationInvariantBroken(Bug):
    """Allocations do not add up to the payment."""
