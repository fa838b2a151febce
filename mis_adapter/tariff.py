"""Electricity tariffs (电价), pure: prices a month's consumption in fen.
Residential customers pay a three-tier monthly block tariff (阶梯电价);
commercial and industrial customers a flat rate. Prices are fen per kWh
(integers), so a bill is an exact integer."""
from __future__ import annotations

from dataclasses import dataclass

RESIDENTIAL, COMMERCIAL, INDUSTRIAL = "RESIDENTIAL", "COMMERCIAL", "INDUSTRIAL"
TARIFF_CLASSES = (RESIDENTIAL, COMMERCIAL, INDUSTRIAL)


@dataclass(frozen=True)
class Tariff:
    tier1_kwh: int = 200
    tier2_kwh: int = 400
    tier1_fen_per_kwh: int = 56
    tier2_fen_per_kwh: int = 61
    tier3_fen_per_kwh: int = 86
    commercial_fen_per_kwh: int = 95
    industrial_fen_per_kwh: int = 80


def price_fen(kwh: int, tariff_class: str, t: Tariff = Tariff()) -> int:
    if kwh < 0:
        raise ValueError("consumption cannot be negative")
    if tariff_class == COMMERCIAL:
        return kwh * t.commercial_fen_per_kwh
    if tariff_class == INDUSTRIAL:
        return kwh * t.industrial_fen_per_kwh
    if tariff_class != RESIDENTIAL:
        raise ValueError(f"unknown tariff class {tariff_class!r}")
    tier1 = min(kwh, t.tier1_kwh)
    tier2 = min(max(kwh - t.tier1_kwh, 0), t.tier2_kwh - t.tier1_kwh)
    tier3 = max(kwh - t.tier2_kwh, 0)
    return tier1 * t.tier1_fen_per_kwh + tier2 * t.tier2_fen_per_kwh + tier3 * t.tier3_fen_per_kwh
