"""The portal's pure pieces: money and month wording, the SVG chart, the
bounded attempt limiter, and the address mask mis_adapter applies."""
from __future__ import annotations

import re

import pytest

from mis_adapter.customers import mask_address, phone_matches
from portal import chart, i18n
from portal.limiter import AttemptLimiter
from portal.serve import parse


@pytest.mark.parametrize(("fen", "zh", "en"), [
    (0, "0.00 元", "¥0.00"), (5, "0.05 元", "¥0.05"), (1_000, "10.00 元", "¥10.00"),
    (10_000_010, "100,000.10 元", "¥100,000.10"), (-250, "-2.50 元", "¥-2.50"),
])
def test_money_reads_in_yuan(fen: int, zh: str, en: str) -> None:
    assert i18n.money(fen, "zh") == zh and i18n.money(fen, "en") == en


def test_months_and_dates() -> None:
    assert i18n.month("202612", "zh") == "2026年12月" and i18n.month("202601", "en") == "Jan 2026"
    assert i18n.month("202610", "zh", short=True) == "10月"
    assert i18n.lang_of("en") == "en" and i18n.lang_of("fr") == "zh" and i18n.lang_of(None) == "zh"
    assert set(i18n.MESSAGES["zh"]) == set(i18n.MESSAGES["en"])


@pytest.mark.parametrize(("value", "nice"), [(0, 1), (1, 1), (3, 5), (10, 10), (11, 20), (480, 500), (501, 1000)])
def test_nice_ceiling(value: int, nice: int) -> None:
    assert chart.nice_ceiling(value) == nice


def test_chart_has_one_bar_and_dot_per_month_and_escapes_text() -> None:
    months = [chart.Month(f"{m}月", 100 * m, 5_000 * m, f"<b>{m}</b>") for m in range(1, 13)]
    svg = chart.consumption_svg(months, title="t<script>", legend_kwh="kWh", legend_charge="元")
    assert svg.count('class="bar-kwh"') == 12 and svg.count('class="dot-charge"') == 12
    assert "<script>" not in svg and "<b>" not in svg and "&lt;b&gt;" in svg
    heights = [float(h) for h in re.findall(r'class="bar-kwh"[^>]*height="([0-9.]+)"', svg)]
    assert heights == sorted(heights) and heights[-1] > heights[0] > 0
    assert "style=" not in svg  # the CSP allows no inline style


def test_limiter_counts_every_attempt_and_fails_closed_when_full() -> None:
    lim = AttemptLimiter("3/minute", "2/hour", keys_max=4)
    assert [lim.allow_client("10.0.0.1") for _ in range(4)] == [True, True, True, False]
    assert [lim.allow_account("0100000017") for _ in range(3)] == [True, True, False]
    assert lim.allow_account("0100000025") and lim.tracked() == 3
    assert lim.allow_account("0100000033") and lim.tracked() == 4
    assert not lim.allow_account("0100000041")  # table full: refused, and not tracked
    assert lim.tracked() == 4


def test_address_mask_and_phone_factor() -> None:
    assert mask_address("黄河路698号3单元502室") == "黄河路" + "*" * 11
    assert mask_address("北京市朝阳区建国路88号") == "北京市朝阳区" + "*" * 6
    assert mask_address("1号") == "**" and mask_address("") == ""
    assert phone_matches("138-1234-5678", "5678") and not phone_matches("13812345678", "5679")
    assert not phone_matches("678", "0678")


def test_portal_settings_defaults_and_flags() -> None:
    s = parse([])
    assert (s.listen, s.upstream, s.operator) == ("127.0.0.1:8080", "127.0.0.1:50051", "portal")
    s = parse(["--listen", "0.0.0.0:9000", "--upstream", "10.0.0.5:50051", "--operator", "web1",
               "--limit-per-account", "5/hour"])
    assert (s.listen, s.upstream, s.operator, s.limit_per_account) == ("0.0.0.0:9000", "10.0.0.5:50051", "web1",
                                                                       "5/hour")


def test_plain_http_refused_off_loopback() -> None:
    from portal.serve import main
    with pytest.raises(SystemExit, match="refusing plain HTTP"):
        main(["--listen", "0.0.0.0:0", "--insecure", "--metrics-port", "0"])
