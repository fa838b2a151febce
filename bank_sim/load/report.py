"""The result and the check as rich tables."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from bank_sim.load.check import CheckResult
from bank_sim.load.profile import DISCREPANCIES_SHOWN_MAX, DROPPED
from bank_sim.load.run import LoadResult

# ---- reporting ----

def _us_per_call(cpu_s: float, calls: int) -> str:
    return f"{cpu_s / calls * 1e6:,.0f}" if calls else "-"


def _ms(v: float) -> str:
    return f"{v:,.2f}"


def result_tables(r: LoadResult) -> list[Table]:
    head = Table(title=f"load {r.target} bank {r.bank_id}: offered {r.offered_rate_per_s:,.0f}/s for "
                       f"{r.duration_s:g} s (+{r.warmup_s:g} s warm-up), concurrency {r.concurrency}", show_header=False)
    head.add_column("what")
    head.add_column("value", justify="right")
    for k, v in (("arrivals (measured)", f"{r.arrivals:,}"), ("issued", f"{r.issued:,}"),
                 ("dropped (no free slot)", f"{r.dropped:,}"), ("completed", f"{r.completed:,}"),
                 ("rate", f"{r.rate_per_s:,.1f}/s over {r.span_s:g} s"), ("OK", f"{r.ok:,}"),
                 ("retries (same serial)", f"{r.retries:,}"), ("scheduler lag max", f"{r.scheduler_lag_max_ms:,.2f} ms"),
                 ("generator CPU", f"{r.generator_cpu_s:.2f} s, {_us_per_call(r.generator_cpu_s, r.calls_total)} µs/call"),
                 ("load average", " ".join(f"{x:.2f}" for x in r.load_average))):
        head.add_row(k, v)
    lat = Table(title="latency from intended send time (ms)")
    for col in ("op", "count", "rate/s", "fastest", "mean", "slowest", "p50", "p90", "p99", "p99.9", "errors"):
        lat.add_column(col, justify="left" if col == "op" else "right")
    rows = [(op, o.count, o.rate_per_s, o.latency, o.codes) for op, o in r.ops.items()]
    rows.append(("all", r.completed, r.rate_per_s, r.latency, r.codes))
    for op, count, rate, s, codes in rows:
        errors = sum(n for c, n in codes.items() if c not in ("OK", DROPPED))
        lat.add_row(op, f"{count:,}", f"{rate:,.1f}", _ms(s.fastest_ms), _ms(s.mean_ms), _ms(s.slowest_ms),
                    _ms(s.p50_ms), _ms(s.p90_ms), _ms(s.p99_ms), _ms(s.p999_ms), f"{errors:,}")
    dist = Table(title="status code distribution")
    dist.add_column("op")
    dist.add_column("code")
    dist.add_column("count", justify="right")
    for op, o in r.ops.items():
        for code, n in sorted(o.codes.items(), key=lambda kv: -kv[1]):
            dist.add_row(op, code, f"{n:,}")
    return [head, lat, dist]


def print_check(console: Console, c: CheckResult) -> None:
    verdict = "[green]OK[/green]" if c.ok else f"[red]FAILED: {c.discrepancy_count} discrepancies[/red]"
    console.print(f"check ({c.source}): {verdict} — {c.pays_checked:,} pays; accepted {c.accepted:,} "
                  f"({c.accepted_fen:,} fen), cancelled {c.cancelled:,} ({c.cancelled_fen:,} fen), "
                  f"MIS POSTED {c.mis_posted:,} ({c.mis_posted_fen:,} fen)")
    for d in c.discrepancies[:DISCREPANCIES_SHOWN_MAX]:
        console.print(f"  DISCREPANCY {d.kind} serial={d.bank_serial} {d.detail}", markup=False, highlight=False,
                      soft_wrap=True)
    if c.discrepancy_count > DISCREPANCIES_SHOWN_MAX:
        console.print(f"  ... and {c.discrepancy_count - DISCREPANCIES_SHOWN_MAX} more")
