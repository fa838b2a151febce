"""`python -m mis_adapter bench-pay` (`make bench-pay`): the CPU a Pay costs
inside mis_adapter, without gRPC: `payments.pay` called in a loop on one
connection (pooled; the fast path's a kept one, pay_pg.KeptConnections), on SQLite and PostgreSQL, the portable statements
(`--pay-portable-sql`, the path every pay took before issue 11) and the
PostgreSQL fast path (pay_pg.py) in interleaved rounds. Prints per round and
variant: pays/s, this process's CPU µs per pay and, on PostgreSQL, the
server backend's CPU µs per pay (from /proc), with the load average."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter import pay_pg, payments
from mis_adapter.context import AdapterContext
from mis_adapter.db.base import table_of
from mis_adapter.db.core import Bank, BillRow, Branch, Customer
from mis_adapter.migrate import upgrade
from mis_adapter.payments import PayCommand
from mis_adapter.settings import AdapterSettings
from yindian_common.clock import ManualClock
from yindian_common.db import create_database, drop_database
from yindian_common.fields import make_account_no
from yindian_common.settings import load_settings

NOON = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
BILL_FEN = 100_000
BILLS_PER_ACCOUNT = 3
PAY_FEN = 100
CLK_TCK = os.sysconf("SC_CLK_TCK")


def seed(engine: Engine, accounts: int) -> list[str]:
    upgrade(engine)
    accts = [make_account_no("01", i) for i in range(1, accounts + 1)]
    with engine.begin() as conn:
        conn.execute(sa.insert(table_of(Bank)), [{"bank_id": "ICBC", "name": "ICBC", "suspended": False,
                                                  "suspended_reason": "", "updated_at": NOON}])
        conn.execute(sa.insert(table_of(Branch)), [{"code": "01", "name": "branch 01"}])
        conn.execute(sa.insert(table_of(Customer)), [
            {"account_no": a, "branch_code": "01", "name": "张三", "address": "x", "phone": "1",
             "tariff_class": "RESIDENTIAL", "status": "OPEN", "prepaid_fen": 0, "opened_on": dt.date(2020, 1, 1)}
            for a in accts])
        periods = [("202608", dt.date(2026, 9, 25)), ("202609", dt.date(2026, 10, 25)),
                   ("202610", dt.date(2026, 11, 25))][:BILLS_PER_ACCOUNT]
        conn.execute(sa.insert(table_of(BillRow)), [
            {"account_no": a, "period": p, "kwh": 100, "amount_fen": BILL_FEN, "prepaid_applied_fen": 0,
             "principal_paid_fen": 0, "late_fee_paid_fen": 0, "accrual_micro": 0, "accrual_date": due,
             "due_date": due, "issued_at": NOON, "status": "UNPAID", "paid_on": None, "dunning": False}
            for a in accts for p, due in periods])
    return accts


def backend_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pays_backend_pid(v: Variant) -> int | None:
    """The backend the next pays run on: the kept connection's (pay_pg.KeptConnections; the loop pays one
    at a time, so one is open) once a pay opened it, else the pool's (the portable variant)."""
    engine = v.ctx.router.primary
    if engine.dialect.name != "postgresql":
        return None
    kept_pool = pay_pg.kept_connections(engine)
    if kept_pool is not None and kept_pool._free:
        return int(kept_pool._free[-1].raw.info.backend_pid)
    return v.backend_pid


@dataclass
class Variant:
    name: str
    ctx: AdapterContext
    backend_pid: int | None


def make_variant(name: str, url: str, portable: bool) -> Variant:
    # db_pool_size 2: the shares must stay below the pool; one connection serves the loop
    settings = load_settings(AdapterSettings, {"db": url, "db_pool_size": 2, "pay_portable_sql": portable,
                                               "insecure": True})
    ctx = AdapterContext.build(settings, ManualClock(NOON))
    pid = None
    if ctx.router.primary.dialect.name == "postgresql":
        with ctx.router.primary.connect() as conn:
            pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
    return Variant(name, ctx, pid)


def run_round(v: Variant, accts: list[str], pays: int, tag: str) -> tuple[float, float, float]:
    rng = random.Random(tag)
    cmds = [PayCommand("ICBC", f"{tag}-{i}", rng.choice(accts), PAY_FEN, "OUT1", "T01") for i in range(pays)]
    pid = pays_backend_pid(v)
    cpu0, wall0, srv0 = time.process_time(), time.perf_counter(), backend_cpu_s(pid)
    for cmd in cmds:
        payments.pay(v.ctx, cmd)
    cpu, wall, srv = (time.process_time() - cpu0, time.perf_counter() - wall0,
                      backend_cpu_s(pid) - srv0)
    return pays / wall, cpu / pays * 1e6, srv / pays * 1e6


def bench_backend(backend: str, args: argparse.Namespace, work: Path) -> None:
    name = f"yd_benchpay_{uuid.uuid4().hex[:8]}"
    url = (create_database(args.pg_admin_url, name) if backend == "postgresql"
           else f"sqlite:///{work / (name + '.db')}")
    try:
        eng = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        accts = seed(eng, args.accounts)
        eng.dispose()
        variants = [make_variant("portable", url, True)]
        if backend == "postgresql":
            variants.append(make_variant("fast", url, False))
        results: dict[str, list[tuple[float, float, float]]] = {v.name: [] for v in variants}
        for v in variants:
            run_round(v, accts, args.warmup, f"W{v.name}")
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                res = run_round(v, accts, args.pays, f"R{r}{v.name}")
                results[v.name].append(res)
                print(f"{backend:10s} round={r} {v.name:8s} pays/s={res[0]:7.0f} cpu_us_per_pay={res[1]:6.0f} "
                      f"server_cpu_us_per_pay={res[2]:6.0f} load={os.getloadavg()[0]:.2f}", flush=True)
        for v in variants:
            rs = results[v.name]
            print(f"SUMMARY {backend} {v.name}: median pays/s={statistics.median(x[0] for x in rs):.0f} "
                  f"mis_adapter CPU/pay={statistics.median(x[1] for x in rs):.0f} us "
                  f"server CPU/pay={statistics.median(x[2] for x in rs):.0f} us "
                  f"(loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)
            v.ctx.close()
    finally:
        if backend == "postgresql":
            drop_database(args.pg_admin_url, name)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mis_adapter bench-pay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="postgresql,sqlite", help="comma-separated: sqlite, postgresql")
    p.add_argument("--accounts", type=int, default=2_000, help="accounts the pays spread over")
    p.add_argument("--pays", type=int, default=2_000, help="pays per round and variant")
    p.add_argument("--warmup", type=int, default=300, help="pays per variant before the first round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    p.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        for backend in args.backends.split(","):
            bench_backend(backend.strip(), args, Path(work))
    return 0
