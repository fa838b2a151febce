"""The customer channels' part of `make run` (bank_sim demo-day): start the
web portal, and run a voice dunning campaign with the recording dialer.

Steps take bank_sim's DemoDay (typed loosely: bank_sim imports this module,
not the other way round). mis_adapter must have been started with the demo
operators' roles (DEMO_OPERATOR_FLAGS)."""
from __future__ import annotations

import datetime as dt
import importlib.util
import json
import urllib.request
from pathlib import Path
from typing import Any

from ivr.customer_client import CustomerClient
from yindian_common.clock import business_date, make_clock
from yindian_common.server import open_channel

PORTAL_OPERATOR = "portal"
DUNNING_OPERATOR = "dunning"
# Roles mis_adapter grants in the demo: the portal reads overviews with the
# phone factor; the dunning process lists candidates and reads without it.
DEMO_OPERATOR_FLAGS = ("--operator", PORTAL_OPERATOR, "--operator", DUNNING_OPERATOR,
                       "--factorless-operator", DUNNING_OPERATOR, "--dunning-operator", DUNNING_OPERATOR)
# A demo campaign places at most this many calls (each renders a personal prompt).
DEMO_CALLS_MAX = 20
DEMO_HTTP_TIMEOUT_S = 5.0


def portal_step(day: Any) -> None:
    """Starts `python -m portal serve` against the demo's mis_adapter and says where it is."""
    if importlib.util.find_spec("portal") is None:
        day.console.print("  (no portal package in this tree: skipped)")
        return
    upstream = day.servers["mis_adapter"].grpc_addr
    proc = day.start("portal", ["portal", "serve", "--listen", "127.0.0.1:0", "--upstream", upstream,
                                "--insecure", "--operator", PORTAL_OPERATOR, "--metrics-port", "0"])
    url = f"http://{proc.grpc_addr}/"
    with urllib.request.urlopen(url, timeout=DEMO_HTTP_TIMEOUT_S) as r:  # noqa: S310 (loopback, ours)
        status = r.status
    day.facts["portal_url"] = url
    day.console.print(f"  customer portal served at [bold]{url}[/bold]")
    day.console.print(f"  (网上查询, HTTP {status}; stopped with the other processes at the end of the day)")


def _households_answer(day: Any, today: dt.date, work: Path) -> tuple[Path, Path]:
    """How the demo's households behave on the phone: of the first ones in
    arrears, two asked not to be called, every fourth does not answer and
    every fourth is busy; the rest answer."""
    channel = open_channel(day.servers["mis_adapter"].grpc_addr, tls=None, insecure=True)
    try:
        client = CustomerClient(channel, DUNNING_OPERATOR, DEMO_HTTP_TIMEOUT_S, candidates_page_size=DEMO_CALLS_MAX)
        first = [c.account_no for _, c in zip(range(DEMO_CALLS_MAX), client.candidates(today, 1, 1, 1), strict=False)]
    finally:
        channel.close()
    script = {a: ["NO_ANSWER" if i % 4 == 1 else "BUSY" if i % 4 == 3 else "ANSWERED"] for i, a in enumerate(first)}
    (work / "dunning-script.json").write_text(json.dumps(script), encoding="utf-8")
    (work / "dunning-opt-out.txt").write_text("".join(f"{a}\n" for a in first[:2]), encoding="utf-8")
    return work / "dunning-script.json", work / "dunning-opt-out.txt"


def dunning_step(day: Any) -> None:
    """One pass of a voice dunning campaign, recording dialer, at 10:00 local time of the
    demo's business day (dunning honours quiet hours, so a demo run at night still calls)."""
    from rich.table import Table

    from bank_sim.processes import run_command

    s = day.settings
    clock = make_clock(s.clock_start)
    today = business_date(clock)
    at_ten = dt.datetime.combine(today, dt.time(10, 0), tzinfo=clock.tz).isoformat()
    spool = Path(day.work) / "spool"
    report_file = Path(day.work) / "dunning-report.json"
    script_file, opt_out_file = _households_answer(day, today, Path(day.work))
    run_command("dunning", [
        "ivr", "dunning", "--upstream", day.servers["mis_adapter"].grpc_addr, "--insecure",
        "--operator", DUNNING_OPERATOR, "--spool-dir", str(spool), "--prompt-dir", str(Path(day.work) / "prompts"),
        "--backend", "recording", "--clock-start", at_ten, "--campaign-id", f"DEMO-{today:%Y%m%d}",
        "--calls-per-run-max", str(DEMO_CALLS_MAX), "--min-days-overdue", "1", "--report-json", str(report_file),
        "--recording-outcomes", str(script_file), "--opt-out-file", str(opt_out_file)],
        log_dir=day.work, timeout_s=s.step_timeout_s, cwd=Path(__file__).resolve().parents[1])
    report = json.loads(report_file.read_text(encoding="utf-8"))
    table = Table(title=f"Voice dunning campaign {report['campaign_id']} (自动语音催费, recording dialer)")
    table.add_column("what")
    table.add_column("households", justify="right")
    table.add_row("in arrears (candidates)", f"{report['candidates']:,}", style="bold")
    table.add_row("called", f"{report['calls']:,}")
    for outcome, n in report["outcomes"].items():
        table.add_row(f"recorded {outcome}", f"{n:,}")
    for why, n in report["held"].items():
        table.add_row(f"not called: {why}", f"{n:,}")
    table.add_row("arrears reached (yuan)", f"{report['arrears_reached_fen'] / 100:,.2f}")
    day.sections.append(table)
    day.facts["dunning"] = report
    calls = report["calls"]
    day.console.print(f"  campaign {report['campaign_id']}: {report['candidates']:,} households in arrears, "
                      f"{calls} calls recorded in {spool / 'recorded-calls.jsonl'}, "
                      f"{report['arrears_reached_fen'] / 100:,.2f} yuan of arrears reached")
