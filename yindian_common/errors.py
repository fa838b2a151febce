"""Expected failures: the one small tree of domain exceptions, each with the
gRPC status name it maps to at the edge and a stable UPPER_SNAKE reason.

    YinDianError
    ├── InvalidField            INVALID_ARGUMENT  (names the field)
    ├── AccountNotFound         NOT_FOUND
    ├── SerialConflict          ALREADY_EXISTS
    ├── Precondition            FAILED_PRECONDITION
    │   ├── DayClosed
    │   ├── SerialReversed
    │   └── AccountClosed
    ├── Forbidden               PERMISSION_DENIED
    ├── Unauthenticated         UNAUTHENTICATED
    ├── Exhausted               RESOURCE_EXHAUSTED
    ├── Unavailable             UNAVAILABLE
    │   └── BankSuspended
    └── InFlight                ABORTED (a duplicate whose original is still being applied)

Anything else raised on a request path is a bug and is not caught."""
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


class AccountNotFound(YinDianError):
    code = "NOT_FOUND"
    reason = "ACCOUNT_NOT_FOUND"


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


class InFlight(YinDianError):
    code = "ABORTED"
    reason = "DUPLICATE_IN_FLIGHT"
