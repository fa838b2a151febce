"""The consumption chart, drawn on the server as SVG: one bar per month for
kWh (left scale) and a line with a dot per month for the charge in yuan
(right scale). No script, no inline style (the CSP forbids both): colours
are presentation attributes and classes styled by portal.css. Pure: takes
numbers, returns markup with every text escaped."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 640
HEIGHT = 320
PAD_LEFT = 60
PAD_RIGHT = 64
PAD_TOP = 44
PAD_BOTTOM = 40
FONT = 17
TICKS = 4
BAR_FILL = "#4a90c2"
LINE_STROKE = "#d9822b"
NICE_STEPS = (1, 2, 5, 10)


@dataclass(frozen=True)
class Month:
    label: str  # e.g. 10月 / Oct
    kwh: int
    charge_fen: int
    title: str  # the tooltip: month, kWh and charge spelled out


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 x 10^k that is >= value (at least 1), so ticks read well."""
    if value <= 1:
        return 1
    magnitude = 1
    while magnitude * 10 < value:
        magnitude *= 10
    for step in NICE_STEPS:
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def _tick_label(value: int, per_unit: int) -> str:
    v = value / per_unit
    return f"{v:,.0f}" if v == int(v) else f"{v:,.1f}"


def consumption_svg(months: Sequence[Month], *, title: str, legend_kwh: str, legend_charge: str) -> str:
    """Months oldest first. Bars carry class 'bar-kwh', dots class 'dot-charge'."""
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    base_y = PAD_TOP + plot_h
    kwh_max = nice_ceiling(max((m.kwh for m in months), default=0))
    # Right scale in whole yuan (fen / 100), nice-rounded.
    yuan_max = nice_ceiling(-(-max((m.charge_fen for m in months), default=0) // 100))
    slot = plot_w / max(1, len(months))
    bar_w = slot * 0.6
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
           f'role="img" aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">',
           f"<title>{escape(title)}</title>"]
    for i in range(TICKS + 1):
        y = base_y - plot_h * i / TICKS
        out.append(f'<line class="grid" x1="{PAD_LEFT}" y1="{y:.1f}" x2="{WIDTH - PAD_RIGHT}" y2="{y:.1f}" '
                   f'stroke="#ddd" stroke-width="1"/>')
        out.append(f'<text class="axis" x="{PAD_LEFT - 6}" y="{y + 5:.1f}" text-anchor="end" font-size="{FONT}" '
                   f'fill="#555">{_tick_label(kwh_max * i, TICKS)}</text>')
        out.append(f'<text class="axis" x="{WIDTH - PAD_RIGHT + 6}" y="{y + 5:.1f}" text-anchor="start" '
                   f'font-size="{FONT}" fill="#555">{_tick_label(yuan_max * i, TICKS)}</text>')
    points = []
    for i, m in enumerate(months):
        cx = PAD_LEFT + slot * i + slot / 2
        h = plot_h * m.kwh / kwh_max
        out.append(f'<rect class="bar-kwh" x="{cx - bar_w / 2:.1f}" y="{base_y - h:.1f}" width="{bar_w:.1f}" '
                   f'height="{h:.1f}" fill="{BAR_FILL}"><title>{escape(m.title)}</title></rect>')
        out.append(f'<text class="month" x="{cx:.1f}" y="{base_y + 22}" text-anchor="middle" font-size="{FONT}" '
                   f'fill="#333">{escape(m.label)}</text>')
        points.append((cx, base_y - plot_h * (m.charge_fen / 100) / yuan_max, m.title))
    if points:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
        out.append(f'<polyline class="line-charge" points="{path}" fill="none" stroke="{LINE_STROKE}" '
                   f'stroke-width="2"/>')
        for x, y, tip in points:
            out.append(f'<circle class="dot-charge" cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{LINE_STROKE}">'
                       f"<title>{escape(tip)}</title></circle>")
    out.append(f'<rect x="{PAD_LEFT}" y="10" width="14" height="14" fill="{BAR_FILL}"/>'
               f'<text x="{PAD_LEFT + 20}" y="23" font-size="{FONT}" fill="#333">{escape(legend_kwh)}</text>')
    lx = PAD_LEFT + 240
    out.append(f'<line x1="{lx}" y1="17" x2="{lx + 18}" y2="17" stroke="{LINE_STROKE}" stroke-width="3"/>'
               f'<circle cx="{lx + 9}" cy="17" r="4" fill="{LINE_STROKE}"/>'
               f'<text x="{lx + 26}" y="23" font-size="{FONT}" fill="#333">{escape(legend_charge)}</text>')
    out.append("</svg>")
    return "".join(out)
