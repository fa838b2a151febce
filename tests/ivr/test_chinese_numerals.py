"""Amounts and dates read aloud in Mandarin (ivr.chinese_numerals)."""
from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivr.chinese_numerals import account_digits, date_words, fen_words, integer_words

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(("amount_fen", "spoken"), [
    (5, "五分"),                          # 0.05 元: no 零元 in front
    (1_000, "十元整"),                    # 10.00 元: 十, not 一十; 整 when no 角/分
    (10_000_010, "十万元零一角"),         # 100,000.10 元
    (101, "一元零一分"),                  # 1.01 元: 零 stands for the missing 角
    (0, "零元整"),
    (1_000_100, "一万零一元整"),          # 10,001.00 元
    (2_050, "二十元零五角"),              # 20.50 元: 零 after yuan ending in a zero digit
    (10, "一角"),
    (15, "一角五分"),
    (110, "一元一角"),
    (1_005, "十元零五分"),
    (1_015, "十元零一角五分"),
    (12_345, "一百二十三元四角五分"),
    (100_100, "一千零一元整"),
    (1_000_000_000, "一千万元整"),        # the largest single payment
    (123_456_789, "一百二十三万四千五百六十七元八角九分"),
])
def test_amounts_read_like_a_clerk(amount_fen: int, spoken: str) -> None:
    assert fen_words(amount_fen) == spoken


@pytest.mark.parametrize(("n", "spoken"), [
    (10, "十"), (11, "十一"), (20, "二十"), (110, "一百一十"), (1001, "一千零一"), (1010, "一千零一十"),
    (10_010, "一万零一十"), (1_000_100, "一百万零一百"), (1_001_000, "一百万一千"),
    (1_010_000, "一百零一万"), (100_000_000, "一亿"), (100_010_000, "一亿零一万"),
    (100_000_001, "一亿零一"), (10_000_001_000, "一百亿零一千"),
])
def test_integers_place_zero_and_ten_correctly(n: int, spoken: str) -> None:
    assert integer_words(n) == spoken


@pytest.mark.parametrize(("day", "spoken"), [
    (dt.date(2026, 12, 1), "二〇二六年十二月一日"),
    (dt.date(2026, 12, 31), "二〇二六年十二月三十一日"),     # year's last day
    (dt.date(2027, 1, 1), "二〇二七年一月一日"),              # year boundary
    (dt.date(2026, 1, 31), "二〇二六年一月三十一日"),         # month boundary
    (dt.date(2026, 2, 1), "二〇二六年二月一日"),
    (dt.date(2028, 2, 29), "二〇二八年二月二十九日"),         # leap day
    (dt.date(2000, 10, 20), "二〇〇〇年十月二十日"),
    (dt.date(2026, 11, 10), "二〇二六年十一月十日"),
])
def test_dates_read_year_digit_by_digit(day: dt.date, spoken: str) -> None:
    assert date_words(day) == spoken


def test_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError):
        fen_words(-1)
    with pytest.raises(ValueError):
        integer_words(10 ** 16)
    with pytest.raises(ValueError):
        account_digits("12a4")
    assert account_digits("0571") == "零五七一"


_VALUE = {c: i for i, c in enumerate("零一二三四五六七八九")}
_SMALL = {"十": 10, "百": 100, "千": 1000}


def _parse_below_10k(words: str) -> int:
    total, digit = 0, 0
    for ch in words:
        if ch in _VALUE:
            digit = _VALUE[ch]
        else:
            total += (digit or 1) * _SMALL[ch]
            digit = 0
    return total + digit


def _parse_integer(words: str) -> int:
    """Independent reader of what integer_words writes, below 一亿 (for the round-trip property)."""
    if "万" in words:
        high, low = words.split("万")
        return _parse_below_10k(high) * 10_000 + _parse_below_10k(low)
    return _parse_below_10k(words)


@given(st.integers(min_value=0, max_value=99_999_999))
def test_integer_words_round_trip(n: int) -> None:
    words = integer_words(n)
    assert _parse_integer(words) == n, words
    assert "零零" not in words
    assert n == 0 or not words.endswith("零")


@given(st.integers(min_value=0, max_value=1_000_000_000))
def test_every_amount_names_its_units_once(amount_fen: int) -> None:
    words = fen_words(amount_fen)
    yuan, rest = divmod(amount_fen, 100)
    assert ("元" in words) == (yuan > 0 or amount_fen == 0)
    assert ("角" in words) == (rest // 10 > 0)
    assert ("分" in words) == (rest % 10 > 0)
    assert words.endswith("整") == (rest == 0)


def _parse_fen(words: str) -> int:
    """Independent reader of what fen_words writes, for amounts below 一亿元."""
    if words == "零元整":
        return 0
    words = words.removesuffix("整")
    yuan = 0
    if "元" in words:
        head, words = words.split("元")
        yuan = _parse_integer(head)
    words = words.removeprefix("零")
    jiao = fen = 0
    if "角" in words:
        head, words = words.split("角")
        jiao = _VALUE[head]
    words = words.removeprefix("零")
    if "分" in words:
        fen = _VALUE[words.removesuffix("分")]
    return yuan * 100 + jiao * 10 + fen


@given(st.integers(min_value=0, max_value=1_000_000_000))
def test_every_amount_reads_back_to_itself(amount_fen: int) -> None:
    assert _parse_fen(fen_words(amount_fen)) == amount_fen
