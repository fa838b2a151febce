"""Bench: the bridge's CPU per control-totals exchange (the bank side of continuous reconciliation)
with a journal of N rows over the two business days, full read (`journal_view`, what every exchange
did before) against the incremental cache (`JournalViewCache`), interleaved A B A B.

Between two exchanges `--changes` pays are journaled and posted as the bridge does (row PENDING, then
the outcome with its audit line), plus a few left in doubt and a few cancels; that work is not timed.
Prints per round: bridge CPU ms and wall ms per exchange, rows read, and the load average."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy.engine import Engine

from bridge import journal as jn
from bridge.control_totals import JournalViewCache, journal_view
from yindian.v1 import billing_pb2 as pb
from yindian_common.db import create_database, drop_database, make_engine

DAY = dt.date(2026, 11, 28)
BANK = "ICBC"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Journaled:
    def __init__(self, engine: Engine) -> None:
        self.journal = jn.Journal(engine)
        self.n = 0
        self.now = dt.datetime(2026, 11, 28, 8, 0, tzinfo=dt.UTC)

    def entry(self, kind: str = jn.PAY, original: str = "", days_back: int = 0) -> jn.Entry:
        self.n += 1
        return jn.Entry(kind=kind, serial=f"{kind[0]}{self.n:012d}", bank_id=BANK, amount_fen=1_000 + self.n % 977,
                        state=jn.PENDING, original_serial=original, account_no="0100000017",
                        business_date=DAY - dt.timedelta(days=days_back), created_at=self.now, updated_at=self.now)

    def posted(self, e: jn.Entry) -> jn.Outcome:
        resp = pb.PayResponse(bank_serial=e.serial, amount_fen=e.amount_fen, settlement_date=DAY.isoformat())
        resp.posted_at.FromDatetime(self.now)
        return jn.outcome_for(e, jn.POSTED, self.now, status_code=0, body=resp.SerializeToString())

    def cancelled(self, e: jn.Entry) -> jn.Outcome:
        body = pb.CancelResponse(outcome=pb.CANCEL_OUTCOME_REVERSED, cancel_serial=e.serial,
                                 original_serial=e.original_serial).SerializeToString()
        return jn.outcome_for(e, jn.CANCELLED, self.now, status_code=0, body=body)

    def day_of(self, pays: int, doubt_every: int = 500, cancel_every: int = 200) -> None:
        """`pays` pays (and their cancels), as the journal writer records them, in batches."""
        for start in range(0, pays, 2_000):
            entries, outcomes = [], []
            for i in range(start, min(pays, start + 2_000)):
                e = self.entry(days_back=1 if i % 10 == 0 else 0)
                entries.append(e)
                if i % doubt_every == 0:
                    continue  # stays PENDING: in doubt
                outcomes.append(self.posted(e))
                if i % cancel_every == 1:
                    c = self.entry(jn.CANCEL, original=e.serial)
                    entries.append(c)
                    outcomes.append(self.cancelled(c))
            self.journal.write(entries, [])
            self.journal.record(outcomes)
            self.now += dt.timedelta(seconds=1)


def bench_backend(backend: str, args: argparse.Namespace, work: Path) -> None:
    name = f"ctotals_bench_{uuid.uuid4().hex[:8]}"
    url = create_database(args.pg_admin_url, name) if backend == "postgresql" else \
        create_database(args.mariadb_admin_url, name) if backend == "mariadb" else \
        f"sqlite:///{work / (name + '.db')}"
    engine = make_engine(url, pool_size=2)
    try:
        jn.create_schema(engine)
        src = Journaled(engine)
        t0 = time.perf_counter()
        src.day_of(args.rows)
        print(f"{backend}: journal of {src.n} rows written in {time.perf_counter() - t0:.1f} s (load {_load()})",
              flush=True)
        cache = JournalViewCache(engine, BANK, rebuild_every=10**9)
        cutoff = src.now + dt.timedelta(hours=1)
        cache.view(DAY, cutoff, cutoff)
        figures: dict[str, list[tuple[float, float, int]]] = {"full": [], "incremental": []}
        for r in range(args.rounds):
            for variant in (("full", "incremental") if r % 2 == 0 else ("incremental", "full")):
                src.day_of(args.changes)  # what an interval brings, before each exchange
                cutoff = src.now + dt.timedelta(hours=1)
                c0, w0 = time.process_time(), time.perf_counter()
                if variant == "full":
                    view = journal_view(engine, BANK, DAY, cutoff, cutoff)
                    rows = -1
                else:
                    view = cache.view(DAY, cutoff, cutoff)
                    rows = cache.rows_read
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                figures[variant].append((cpu, wall, rows))
                print(f"{backend} round={r} {variant:11s} cpu_ms={cpu * 1e3:8.1f} wall_ms={wall * 1e3:8.1f} "
                      f"rows_read={'all' if rows < 0 else rows} posted={view.totals.posted_count} "
                      f"in_doubt={len(view.in_doubt)} load={_load()}", flush=True)
        assert journal_view(engine, BANK, DAY, cutoff, cutoff) == cache.view(DAY, cutoff, cutoff)
        full, inc = figures["full"], figures["incremental"]
        fc, ic = statistics.median(x[0] for x in full), statistics.median(x[0] for x in inc)
        print(f"SUMMARY {backend} rows={src.n} changes/exchange={args.changes}: bridge CPU per exchange "
              f"full {fc * 1e3:.1f} ms, incremental {ic * 1e3:.1f} ms ({fc / max(ic, 1e-9):.0f}x); wall "
              f"{statistics.median(x[1] for x in full) * 1e3:.0f} / {statistics.median(x[1] for x in inc) * 1e3:.0f} ms "
              f"(loadavg {_load()})", flush=True)
    finally:
        engine.dispose()
        if backend == "postgresql":
            drop_database(args.pg_admin_url, name)
        elif backend == "mariadb":
            drop_database(args.mariadb_admin_url, name)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bridge bench-control-totals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="postgresql", help="comma-separated: sqlite, postgresql, mariadb")
    p.add_argument("--rows", type=int, default=10_000, help="pays journaled over the two days before timing")
    p.add_argument("--changes", type=int, default=2_000, help="pays journaled between two exchanges")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (full and incremental each)")
    p.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--mariadb-admin-url", default="mysql://root@127.0.0.1:3306/test")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        for backend in args.backends.split(","):
            bench_backend(backend.strip(), args, Path(work))
    return 0
