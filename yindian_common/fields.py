"""The wire contract's field rules (DESIGN.md "Field rules"), as pure checks
that raise InvalidField naming the field. Used by every server edge."""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from yindian_common.errors import InvalidField

ACCOUNT_NO_LEN = 10
SERIAL_MAX = 32
NAME_MAX = 64
CODE_MAX = 16
REASON_MAX = 128
AMOUNT_MIN_FEN = 1
AMOUNT_MAX_FEN = 1_000_000_000

_SERIAL_RE = re.compile(r"[A-Za-z0-9-]{1,32}")
_CODE_RE = re.compile(r"[A-Za-z0-9_-]*")
_DIGITS_RE = re.compile(r"[0-9]+")
# A standalone run of 10 digits (not part of a serial, code or longer number).
_ACCOUNT_IN_TEXT_RE = re.compile(r"(?<![A-Za-z0-9_-])[0-9]{10}(?![A-Za-z0-9_])")


def luhn_check_digit(body: str) -> int:
    """The Luhn digit that makes `body + digit` valid."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = ord(ch) - 48
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return (10 - total % 10) % 10


def make_account_no(branch_code: str, serial: int) -> str:
    """A valid account number: 2-digit branch, 7-digit serial, Luhn digit."""
    body = f"{branch_code}{serial:07d}"
    if len(body) != 9 or not body.isdigit():
        raise ValueError(f"cannot form an account number from {branch_code!r}/{serial}")
    return body + str(luhn_check_digit(body))


def account_no(value: str, field: str = "account_no") -> str:
    if len(value) != ACCOUNT_NO_LEN or not value.isascii() or not _DIGITS_RE.fullmatch(value):
        raise InvalidField(field, "must be 10 ASCII digits")
    if luhn_check_digit(value[:9]) != ord(value[9]) - 48:
        raise InvalidField(field, "check digit does not match")
    return value


# ---- fast verdicts (no message): the hot path of a million reconcile records ----
# Luhn over a 10-digit number by byte tables built from the same doubling rule as
# luhn_check_digit: from the right, body positions 9, 7, 5, 3, 1 are doubled (minus 9 past 9).
# tests/mis_adapter/test_matching.py holds these equal to account_no() and serial().
def _luhn_term(d: int, doubled: bool) -> int:
    return (2 * d - 9 if 2 * d > 9 else 2 * d) if doubled else d


_LUHN_DOUBLED = bytes(_luhn_term(c - 48, True) if 48 <= c <= 57 else 0 for c in range(256))
_LUHN_PLAIN = bytes(_luhn_term(c - 48, False) if 48 <= c <= 57 else 0 for c in range(256))


def account_no_ok(value: str) -> bool:
    """account_no()'s verdict without building a message."""
    if len(value) != ACCOUNT_NO_LEN or not value.isascii():
        return False
    raw = value.encode("ascii")
    if not raw.isdigit():
        return False
    total = sum(raw[0:9:2].translate(_LUHN_DOUBLED)) + sum(raw[1:9:2].translate(_LUHN_PLAIN))
    return (10 - total % 10) % 10 == raw[9] - 48


def code_ok(value: str) -> bool:
    """code()'s verdict (not `required`) without building a message."""
    return len(value) <= CODE_MAX and value.isascii() and _CODE_RE.fullmatch(value) is not None


def serial_ok(value: str) -> bool:
    """serial()'s verdict without building a message."""
    return value.isascii() and _SERIAL_RE.fullmatch(value) is not None


# ---- batch verdicts: a whole batch in a few C-level passes (a stream message of up to 10k records) ----
# Each is exactly all(<one-value verdict>(v) for v in values) (tests/mis_adapter/test_matching.py holds
# them equal); a False answer says only that some value is bad: the caller then finds and names it one by one.
# The values are joined one per line: a separator cannot hide inside a value, since a value's own "\n"
# would add a line and the count of lines is checked.
_SERIAL_LINES_RE = re.compile(r"(?:[A-Za-z0-9-]{1,32}\n)*")
_ACCOUNT_LINES_RE = re.compile(r"(?:[0-9]{10}\n)*")
# Luhn total (9 body terms + the check digit, at most 90) -> 0 if a multiple of 10, else 1.
_LUHN_TOTAL_BAD = bytes(0 if v % 10 == 0 else 1 for v in range(256))


def serials_ok(values: Sequence[str]) -> bool:
    """all(serial_ok(v) for v in values), by one regex over the values joined one per line."""
    if not values:
        return True
    joined = "\n".join(values) + "\n"
    return joined.count("\n") == len(values) and _SERIAL_LINES_RE.fullmatch(joined) is not None


def account_nos_ok(values: Sequence[str]) -> bool:
    """all(account_no_ok(v) for v in values): one regex for "10 ASCII digits", then the Luhn check of
    every number at once. Digit k of every number is the byte slice joined[k::11]; translated by the
    same tables as account_no_ok and read as one big integer, the slices add up lane by lane (at most
    5*9 + 4*9 + 9 = 90 per byte: no carry), so each byte of the sum is one number's Luhn total."""
    n = len(values)
    if n == 0:
        return True
    joined = "\n".join(values) + "\n"
    if len(joined) != 11 * n or not joined.isascii() or _ACCOUNT_LINES_RE.fullmatch(joined) is None:
        return False
    raw = joined.encode("ascii")
    total = int.from_bytes(raw[9::11].translate(_LUHN_PLAIN), "big")  # the check digit
    for k in range(9):
        total += int.from_bytes(raw[k::11].translate(_LUHN_PLAIN if k % 2 else _LUHN_DOUBLED), "big")
    return 1 not in total.to_bytes(n, "big").translate(_LUHN_TOTAL_BAD)


def serial(value: str, field: str) -> str:
    if not value.isascii() or not _SERIAL_RE.fullmatch(value):
        raise InvalidField(field, "must be 1-32 characters of A-Z a-z 0-9 -")
    return value


def amount_fen(value: int, field: str = "amount_fen") -> int:
    if value < AMOUNT_MIN_FEN or value > AMOUNT_MAX_FEN:
        raise InvalidField(field, f"must be between {AMOUNT_MIN_FEN} and {AMOUNT_MAX_FEN} fen")
    return value


def code(value: str, field: str, *, required: bool = False) -> str:
    if len(value) > CODE_MAX or not value.isascii() or not _CODE_RE.fullmatch(value):
        raise InvalidField(field, f"must be at most {CODE_MAX} characters of A-Z a-z 0-9 _ -")
    if required and not value:
        raise InvalidField(field, "is required")
    return value


def text(value: str, field: str, max_len: int) -> str:
    if len(value) > max_len:
        raise InvalidField(field, f"must be at most {max_len} characters")
    if any(ord(c) < 32 for c in value):
        raise InvalidField(field, "must not contain control characters")
    return value


def iso_date(value: str, field: str) -> dt.date:
    try:
        if len(value) != 10:
            raise ValueError
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidField(field, "must be a date YYYY-MM-DD") from None


def mask_name(name: str) -> str:
    """First character kept: 张** ."""
    if not name:
        return ""
    return name[0] + "*" * max(1, len(name) - 1)


def mask_phone(phone: str) -> str:
    """138****5678: first three and last four digits kept."""
    if len(phone) < 8:
        return "*" * len(phone)
    return phone[:3] + "*" * (len(phone) - 7) + phone[-4:]


def mask_account(account: str) -> str:
    """01******34-style: the branch code and the last two digits kept."""
    if len(account) != ACCOUNT_NO_LEN:
        return "*" * len(account)
    return account[:2] + "*" * 6 + account[-2:]


def mask_accounts(text: str) -> str:
    """Every valid account number (10 digits, Luhn check digit) standing alone in `text`, masked."""
    def one(m: re.Match[str]) -> str:
        digits = m.group(0)
        return mask_account(digits) if luhn_check_digit(digits[:9]) == ord(digits[9]) - 48 else digits
    return _ACCOUNT_IN_TEXT_RE.sub(one, text)
