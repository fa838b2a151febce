"""How amounts of money, dates and digit strings are read aloud in Mandarin.

Pure functions, no I/O: the IVR and the dunning prompts speak what these
return. Money is integer fen and is read the way a bank or a utility clerk
reads a cheque amount:

    5 fen          五分
    1,000 fen      十元整
    101 fen        一元零一分
    2,050 fen      二十元零五角   (零 after 元 when the yuan end in a zero digit)
    10,000,010 fen 十万元零一角
    1,000,100 fen  一万零一元整

Dates read year digit by digit (二〇二六年), month and day as numbers
(十二月一日). This module must never round or approximate an amount."""
from __future__ import annotations

import datetime as dt

__all__ = ["account_digits", "date_words", "fen_words", "integer_words"]

DIGITS = "零一二三四五六七八九"
YEAR_DIGITS = "〇一二三四五六七八九"
_SMALL_UNITS = ("", "十", "百", "千")
_BIG_UNITS = ("", "万", "亿", "万亿")
# Largest integer read: 9999 万亿 - 1 (four groups of four digits).
INTEGER_MAX = 10 ** 16 - 1


def _group_words(group: int) -> str:
    """0 < group < 10,000, read with internal 零 (一千零一, 一百一十)."""
    digits = f"{group:04d}"
    out: list[str] = []
    pending_zero = False
    for pos, ch in enumerate(digits):
        d = int(ch)
        unit = _SMALL_UNITS[3 - pos]
        if d == 0:
            pending_zero = bool(out)
            continue
        if pending_zero:
            out.append("零")
            pending_zero = False
        out.append(DIGITS[d] + unit)
    return "".join(out)


def integer_words(n: int) -> str:
    """A non-negative integer in Chinese numerals: 10 → 十, 10001 → 一万零一, 110 → 一百一十."""
    if n < 0 or n > INTEGER_MAX:
        raise ValueError(f"cannot read {n}: must be between 0 and {INTEGER_MAX}")
    if n == 0:
        return "零"
    groups: list[int] = []
    while n:
        groups.append(n % 10_000)
        n //= 10_000
    out: list[str] = []
    for idx in range(len(groups) - 1, -1, -1):
        g = groups[idx]
        if g == 0:
            continue
        # A zero between this group and a higher non-zero one (一万零一, 一亿零五十万).
        higher_nonzero = any(groups[j] for j in range(idx + 1, len(groups)))
        skipped_group = higher_nonzero and groups[idx + 1] == 0
        if higher_nonzero and (g < 1000 or skipped_group):
            out.append("零")
        out.append(_group_words(g) + _BIG_UNITS[idx])
    words = "".join(out)
    # 一十 at the very start is read 十 (十元, 十万), never inside (一百一十).
    if words.startswith("一十"):
        words = words[1:]
    return words


def fen_words(amount_fen: int) -> str:
    """An amount of money in fen, read in 元/角/分 (0 → 零元整)."""
    if amount_fen < 0:
        raise ValueError(f"cannot read a negative amount ({amount_fen} fen)")
    yuan, rest = divmod(amount_fen, 100)
    jiao, fen = divmod(rest, 10)
    if amount_fen == 0:
        return "零元整"
    out: list[str] = []
    if yuan:
        out.append(integer_words(yuan) + "元")
    if jiao == 0 and fen == 0:
        out.append("整")
        return "".join(out)
    if jiao:
        if yuan and yuan % 10 == 0:
            out.append("零")
        out.append(DIGITS[jiao] + "角")
    if fen:
        if yuan and not jiao:
            out.append("零")
        out.append(DIGITS[fen] + "分")
    return "".join(out)


def date_words(day: dt.date) -> str:
    """二〇二六年十二月一日."""
    year = "".join(YEAR_DIGITS[int(c)] for c in f"{day.year:04d}")
    return f"{year}年{integer_words(day.month)}月{integer_words(day.day)}日"


def account_digits(digits: str) -> str:
    """A digit string read one digit at a time (account numbers, tails of numbers)."""
    if not digits.isascii() or not digits.isdigit():
        raise ValueError("only ASCII digits can be read digit by digit")
    return "".join(DIGITS[int(c)] for c in digits)
