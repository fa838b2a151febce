"""`make run`: a demonstration business day on SQLite (`python -m bank_sim demo-day`).

In a work directory under var/ (emptied at the start of every run) it seeds
the utility, starts mis_adapter and the bank's bridge as real processes on
loopback, serves counter customers through the bridge, prints a summary and
stops every process with SIGTERM.

The day is a list of steps (STEPS). Each step is a function of the DemoDay;
it may add tables to `day.sections` and figures to `day.facts` (which also go
to --summary-json). Later work adds its steps to the list, e.g. issuing bills
with auto-debit after the counter business, and end-of-day reconciliation last.

Never touches anything outside its work directory and never kills a process
it did not start."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bank_sim import autodebit, link_ops, reconcile, teller
from bank_sim.processes import ProcessFailed, ServerProcess, run_command, start_server
from bank_sim.settings import DemoSettings, TellerSettings
from ivr import demo as ivr_demo
from yindian_common.clock import make_clock
from yindian_common.db import make_engine
from yindian_common.settings import add_settings_flags, load_settings

REPO = Path(__file__).resolve().parents[1]
BRANCH_CODES = ("02", "03")  # --branch-topology: the branches with their own database
TOPOLOGY = ("branch topology: front database + primary (branches 01, 04-08) + branch databases 02 and 03, "
            "2 mis_adapter replicas behind the bridge")
DESCRIPTION = "A demonstration business day on SQLite: seed, start mis_adapter and bridge, serve counter customers."


@dataclass
class DemoDay:
    settings: DemoSettings
    console: Console
    work: Path
    mis_db: str = ""
    bridge_db: str = ""
    bank_db: str = ""
    roster_dir: Path = Path()
    # --branch-topology: the branch databases (CODE, URL) beside mis_db, and the front database
    branch_dbs: list[tuple[str, str]] = field(default_factory=list)
    front_db: str = ""
    servers: dict[str, ServerProcess] = field(default_factory=dict)
    sections: list[Any] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def sqlite_url(self, name: str) -> str:
        return f"sqlite:///{self.work / name}"

    def mis_dbs(self) -> list[str]:
        """Every MIS database (issuing bills runs in each)."""
        return [self.mis_db, *(url for _code, url in self.branch_dbs)]

    def branch_flags(self) -> list[str]:
        return [f for code, url in self.branch_dbs for f in ("--branch-db", f"{code}={url}")]

    def clock_flags(self) -> list[str]:
        return ["--clock-start", self.settings.clock_start] if self.settings.clock_start else []

    def start(self, name: str, args: list[str]) -> ServerProcess:
        proc = start_server(name, args, log_dir=self.work, ready_timeout_s=self.settings.ready_timeout_s, cwd=REPO)
        self.servers[name] = proc
        return proc


# ---- the steps of the day ----

def prepare_work_dir(day: DemoDay) -> None:
    if day.work.exists():
        shutil.rmtree(day.work)
    day.work.mkdir(parents=True)
    day.roster_dir = day.work / "rosters"
    day.mis_db = day.sqlite_url("mis.db")
    day.bridge_db = day.sqlite_url("bridge.db")
    day.bank_db = day.sqlite_url("bank.db")
    if day.settings.branch_topology:
        day.branch_dbs = [(code, day.sqlite_url(f"mis-{code}.db")) for code in BRANCH_CODES]
        day.front_db = day.sqlite_url("front.db")
        day.facts["topology"] = TOPOLOGY


def seed_utility(day: DemoDay) -> None:
    run_command("seed", ["mis_adapter", "seed", "--db", day.mis_db, "--accounts", str(day.settings.accounts),
                         "--roster-dir", str(day.roster_dir), *day.branch_flags(), *day.clock_flags()],
                log_dir=day.work, timeout_s=day.settings.step_timeout_s, cwd=REPO)
    rosters = sorted(p.name for p in day.roster_dir.glob("*.csv"))
    day.facts["accounts"] = day.settings.accounts
    day.facts["rosters"] = rosters
    day.console.print(f"  seeded {day.settings.accounts:,} households; rosters: {', '.join(rosters)}")


def start_mis_adapter(day: DemoDay) -> None:
    names = ["mis_adapter", "mis_adapter-b"] if day.settings.branch_topology else ["mis_adapter"]
    front = ["--front-db", day.front_db] if day.front_db else []
    for name in names:
        proc = day.start(name, ["mis_adapter", "serve", "--db", day.mis_db, *day.branch_flags(), *front,
                                "--listen", "127.0.0.1:0", "--metrics-port", "0", "--insecure", *day.clock_flags(),
                                *ivr_demo.DEMO_OPERATOR_FLAGS])
        day.console.print(f"  {name} serving on {proc.grpc_addr} (metrics :{proc.metrics_port})")


def start_bridge(day: DemoDay) -> None:
    upstreams = [p.grpc_addr for name, p in day.servers.items() if name.startswith("mis_adapter")]
    proc = day.start("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0",
                                *(f for u in upstreams for f in ("--upstream", u)),
                                "--db", day.bridge_db, "--bank-id", day.settings.bank_id, "--metrics-port", "0",
                                "--insecure", *day.clock_flags()])
    day.console.print(f"  bridge for {day.settings.bank_id} serving on {proc.grpc_addr} -> {', '.join(upstreams)} "
                      f"(metrics :{proc.metrics_port})")


def counter_business(day: DemoDay) -> None:
    s = day.settings
    settings = load_settings(TellerSettings, {
        "target": day.servers["bridge"].grpc_addr, "bank_id": s.bank_id, "insecure": True, "db": day.bank_db,
        "roster": str(day.roster_dir / f"{s.bank_id}.csv"), "sessions": s.sessions, "customers": s.customers,
        "cancel_ratio": s.cancel_ratio, "clock_start": s.clock_start})
    engine = make_engine(settings.db, pool_size=settings.sessions + 2)
    channel = teller.link_channel(settings)
    try:
        summary = teller.run_counters(settings, engine, channel, make_clock(settings.clock_start))
    finally:
        channel.close()
        engine.dispose()
    day.sections.extend(teller.render_summary(summary))
    day.facts["teller"] = summary.to_json()
    served = sum(summary.customers.values())
    day.console.print(f"  {served:,} customers served by {settings.sessions} tellers in {summary.elapsed_s:.1f} s")
    if summary.passbooks_broken:
        raise RuntimeError(f"{summary.passbooks_broken} passbooks out of balance")
    pending = summary.ledger.get("PENDING", {}).get("count", 0)
    if pending or summary.cancels_in_doubt:
        raise RuntimeError(f"{pending} pays and {summary.cancels_in_doubt} cancels still in doubt at the end of the day")


Step = tuple[str, Callable[[DemoDay], None]]

# The business day, in order. Add a step with one line (and its function above).
STEPS: list[Step] = [
    ("prepare a clean work directory", prepare_work_dir),
    ("seed the utility (mis_adapter seed)", seed_utility),
    ("start mis_adapter", start_mis_adapter),
    ("start the bank's bridge", start_bridge),
    ("counter business through the bridge", counter_business),
    ("auto-debit agreements signed and ended at the counter", link_ops.demo_agreements_step),
    ("bill issuance and auto-debit through the bridge", autodebit.demo_step),
    ("refunds credited to passbooks", link_ops.demo_refunds_step),
    ("day-end sign-off (日终签退) through the bridge", link_ops.demo_sign_off_step),
    ("end-of-day reconciliation through the bridge", reconcile.demo_step),
    ("start the customer portal (网上查询)", ivr_demo.portal_step),
    ("voice dunning campaign (自动语音催费)", ivr_demo.dunning_step),
]


# ---- running the day ----

def stop_servers(day: DemoDay) -> dict[str, int]:
    """SIGTERM in reverse start order (the bridge drains before its upstream); returns exit codes."""
    codes: dict[str, int] = {}
    for name, proc in reversed(list(day.servers.items())):
        try:
            codes[name] = proc.stop(day.settings.stop_timeout_s)
        except ProcessFailed as exc:
            day.console.print(f"[red]{exc}[/red]")
            codes[name] = -9
    day.servers.clear()
    return codes


def run_day(day: DemoDay, steps: list[Step]) -> bool:
    timings = Table(title="Steps of the day")
    timings.add_column("step")
    timings.add_column("seconds", justify="right")
    timings.add_column("result")
    ok = True
    try:
        for title, step in steps:
            day.console.rule(title)
            started = time.perf_counter()
            try:
                step(day)
            except (ProcessFailed, RuntimeError, OSError, ValueError) as exc:
                timings.add_row(title, f"{time.perf_counter() - started:.1f}", "[red]failed[/red]")
                day.console.print(f"[red]step failed: {exc}[/red]")
                ok = False
                break
            timings.add_row(title, f"{time.perf_counter() - started:.1f}", "ok")
    finally:
        codes = stop_servers(day)
    for name, code in codes.items():
        timings.add_row(f"stop {name} (SIGTERM)", "", "exit 0" if code == 0 else f"[red]exit {code}[/red]")
        ok = ok and code == 0
    day.facts["exit_codes"] = codes
    day.sections.insert(0, timings)
    return ok


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim demo-day", description=DESCRIPTION)
    add_settings_flags(parser, DemoSettings)
    args = parser.parse_args(argv)
    settings = load_settings(DemoSettings, args, args.config_file)
    work = Path(settings.work_dir)
    day = DemoDay(settings, Console(), work if work.is_absolute() else REPO / work)
    day.console.print(f"[bold]YinDian demonstration day[/bold] for bank {settings.bank_id}, work dir {day.work}")
    if settings.branch_topology:
        day.console.print(f"  {TOPOLOGY}")
    ok = run_day(day, STEPS)
    day.console.rule("summary")
    day.console.print(f"Topology: {day.facts.get('topology', 'one SQLite database, one mis_adapter')}")
    for section in day.sections:
        day.console.print(section)
    day.facts["ok"] = ok
    if settings.summary_json:
        Path(settings.summary_json).write_text(json.dumps(day.facts, indent=2), encoding="utf-8")
    day.console.print("[green]day complete, all processes stopped cleanly[/green]" if ok
                      else f"[red]the day failed; logs in {day.work}[/red]")
    sys.stdout.flush()
    return 0 if ok else 1
