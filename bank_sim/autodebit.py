"""The bank core's auto-debit consumer (`python -m bank_sim autodebit`):
subscribes to the bill feed through the bridge, debits each savings
account (passbook) that covers its bill and answers DEBITED with a fresh
bank serial, otherwise INSUFFICIENT_FUNDS.

Exactly once on the bank's side: each notice batch is one transaction that
debits the passbooks, writes the ledger rows (channel AUTO_DEBIT, POSTED),
records every notice's result in `autodebit_results` and moves the last
processed seq in `autodebit_cursor`; only then are the results sent. A
notice redelivered after any crash (seq at or below the last processed
one) is answered from `autodebit_results`, never debited again.

Resubscribes after any stream end with bounded, growing back-off; a stream
that stays silent for `silence_s` (no notice, no heartbeat) is abandoned
and resubscribed. With `--idle-exit-s` it exits once every result it sent
is acknowledged (the heartbeat's cursor) and no notice came for that long,
printing one summary line."""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.engine import Connection, Engine

from bank_sim import ledger
from bank_sim.settings import LinkSettings
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common import crash_points
from yindian_common.bulk_sql import InList, _pg_type, bulk_insert, list_param, pg_array
from yindian_common.clock import Clock, business_date, make_clock
from yindian_common.crash_points import crash_point
from yindian_common.db import make_engine
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.logs import setup_logging
from yindian_common.server import TlsFiles, open_channel
from yindian_common.settings import add_settings_flags, load_settings

log = logging.getLogger("bank_sim.autodebit")
REPO = Path(__file__).resolve().parents[1]

DEBITED = "DEBITED"
INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
# a withdrawn notice (the agreement ended before it was answered): nothing is debited
NOT_DEBITED = "NOT_DEBITED"
_OUTCOME_PB = {DEBITED: pb.DEBIT_OUTCOME_DEBITED, INSUFFICIENT_FUNDS: pb.DEBIT_OUTCOME_INSUFFICIENT_FUNDS,
               NOT_DEBITED: pb.DEBIT_OUTCOME_NOT_DEBITED}
_TS = sa.DateTime(timezone=True)

metadata = sa.MetaData()
cursor_table = sa.Table(
    "autodebit_cursor", metadata,
    sa.Column("bank_id", sa.String(16), primary_key=True),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
)
results_table = sa.Table(
    "autodebit_results", metadata,
    sa.Column("bank_id", sa.String(16), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("bill_id", sa.BigInteger, nullable=False),
    sa.Column("account_no", sa.String(10), nullable=False),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("bank_serial", sa.String(32), nullable=False),
    sa.Column("processed_at", _TS, nullable=False),
)


class AutodebitSettings(LinkSettings):
    db: str = Field("sqlite:///var/bank_sim.db", description="the bank core's database URL")
    roster: str = Field("", description="agreement roster CSV: opens passbooks for accounts that have none")
    low_balance_ratio: float = Field(0.15, description="share of passbooks opened too low for a bill")
    seed: int = Field(20261128, description="random seed of opening balances")
    clock_start: str | None = Field(None, description="ISO instant the bank's clock starts at (default: now)")
    silence_s: float = Field(20.0, description="resubscribe when the stream is silent this long")
    idle_exit_s: float = Field(0.0, description="exit when all results are acknowledged and no notice "
                                                "came for this long (0: run until stopped)")
    idle_exit_after_seq: int = Field(0, description="idle exit only once this seq has been processed")
    run_timeout_s: float = Field(0.0, description="give up after this long (0: no limit)")
    results_queue_max: int = Field(64, description="result messages waiting to be sent")
    gc_gen0_threshold: int = Field(20_000, ge=700, le=1_000_000,
                                   description="young objects between garbage collections (CPython: 700); each batch "
                                               "builds and drops a few per notice")
    summary_json: str | None = Field(None, description="also write the summary as JSON to this file")
    log_level: str = Field("INFO", description="log level")
    crash_point: str = Field("", description="TESTS ONLY: SIGKILL this process at the named crash point "
                                             "(yindian_common.crash_points); empty in production")


@dataclass
class Summary:
    bank_id: str
    notices: int = 0
    debited: int = 0
    debited_fen: int = 0
    insufficient: int = 0
    replayed: int = 0
    acked_through_seq: int = 0
    last_seq: int = 0
    streams: int = 0

    def line(self) -> str:
        return (f"autodebit bank={self.bank_id} notices={self.notices} debited={self.debited} "
                f"debited_fen={self.debited_fen} insufficient={self.insufficient} replayed={self.replayed} "
                f"last_seq={self.last_seq} acked_through_seq={self.acked_through_seq} streams={self.streams}")


def create_schema(engine: Engine) -> None:
    ledger.create_schema(engine)
    metadata.create_all(engine, checkfirst=True)


# PostgreSQL: the planner's price of reading a page at random, on the consumer's own sessions (the server
# default, 4.0, prices a disk seek). Each notice batch locks and debits its passbooks by key; at 4.0 both
# statements read every passbook of the bank (a scan and a hash join per batch, 40 ms and more for 2,500
# notices among 100,000 passbooks, whether or not the table was analyzed), at 1.1 they probe the key
# (8 ms): the cost of a batch no longer grows with the number of passbooks.
PG_RANDOM_PAGE_COST = 1.1
# PostgreSQL: the passbooks are analyzed at start when this share of them changed since their last
# ANALYZE (or never analyzed: passbooks opened in bulk just before); ANALYZE waits at most this for its lock.
STATS_STALE_SHARE = 0.1
STATS_LOCK_WAIT_MS = 2_000


def prepare_engine(engine: Engine) -> None:
    """On PostgreSQL: the consumer's sessions priced for key probes (PG_RANDOM_PAGE_COST), and the
    passbooks' planner statistics brought up to date when stale. Elsewhere nothing."""
    if engine.dialect.name != "postgresql":
        return

    @sa.event.listens_for(engine, "connect")
    def _price_pages(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET random_page_cost = {PG_RANDOM_PAGE_COST}")
        dbapi_conn.commit()

    engine.dispose()  # connections opened before (schema, passbooks) are not kept with the default price
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        row = conn.execute(sa.text(
            "SELECT n_live_tup, n_mod_since_analyze, coalesce(last_analyze, last_autoanalyze) IS NULL "
            "FROM pg_stat_user_tables WHERE schemaname = current_schema() AND relname = :name"),
            {"name": ledger.savings.name}).first()
        if row is None or not (row[2] or row[1] > STATS_STALE_SHARE * max(row[0], 1)):
            return
        conn.exec_driver_sql(f"SET lock_timeout = {STATS_LOCK_WAIT_MS}")
        try:
            conn.exec_driver_sql(f"ANALYZE {ledger.savings.name}")
        except sa.exc.OperationalError:
            log.info("event=passbook_statistics_skipped")  # autovacuum is analyzing them
        conn.exec_driver_sql("RESET lock_timeout")


_b = sa.bindparam
_LAST = sa.select(cursor_table.c.last_seq).where(cursor_table.c.bank_id == _b("p_bank"))
_MOVE = (cursor_table.update().where(cursor_table.c.bank_id == _b("p_bank"))
         .values(last_seq=_b("p_seq"), updated_at=_b("p_now")))
_STORED = (sa.select(results_table.c.seq, results_table.c.outcome, results_table.c.bank_serial,
                     results_table.c.amount_fen)
           .where(results_table.c.bank_id == _b("p_bank"), InList(results_table.c.seq, "p_seqs")))
_BALANCES = (sa.select(ledger.savings.c.account_no, ledger.savings.c.balance_fen)
             .where(ledger.savings.c.bank_id == _b("p_bank"), InList(ledger.savings.c.account_no, "p_accts"))
             .with_for_update())
_TAKE = (ledger.savings.update()
         .where(ledger.savings.c.bank_id == _b("p_bank"), ledger.savings.c.account_no == _b("p_acct"))
         .values(balance_fen=ledger.savings.c.balance_fen - _b("p_amount")))


def _take(conn: Connection, bank_id: str, per: dict[str, int]) -> None:
    """The debits of a batch, summed per passbook, in one statement on PostgreSQL."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(
            "UPDATE savings_accounts AS s SET balance_fen = s.balance_fen - v.amt "
            "FROM unnest(%s::text[], %s::bigint[]) AS v(acct, amt) WHERE s.bank_id = %s AND s.account_no = v.acct",
            (pg_array(list(per)), pg_array(list(per.values())), bank_id))
    else:
        conn.execute(_TAKE, [{"p_bank": bank_id, "p_acct": a, "p_amount": f} for a, f in per.items()])


def _insert_columns(conn: Connection, table: sa.Table, shared: dict[str, Any], columns: dict[str, list[Any]]) -> None:
    """Inserts a batch given as values shared by every row and one list per column (all of one length, at
    least 1): on PostgreSQL one `INSERT ... SELECT ... FROM unnest(arrays)` built from the lists as they are,
    elsewhere dict rows through bulk_insert. The batch's rows were dicts of 14 and 8 keys that bulk_insert
    took apart again per column."""
    names = list(columns)
    if conn.dialect.name != "postgresql":
        bulk_insert(conn, table, [dict(shared, **dict(zip(names, values, strict=True)))
                                  for values in zip(*columns.values(), strict=True)])
        return
    exprs = [f"%b::{_pg_type(table.c[name])}" for name in shared]
    types = []
    arrays = []
    for i, name in enumerate(names):
        exprs.append(f"u.a{i}")
        array = pg_array(columns[name])
        arrays.append(array)
        types.append(f"%{'t' if isinstance(array, str) else 'b'}::{_pg_type(table.c[name])}[]")
    conn.exec_driver_sql(f"INSERT INTO {table.name} ({', '.join([*shared, *names])}) SELECT {', '.join(exprs)} "
                         f"FROM unnest({', '.join(types)}) AS u({', '.join(f'a{i}' for i in range(len(names)))})",
                         (*shared.values(), *arrays))


def last_seq(conn: Connection, bank_id: str) -> int:
    return int(conn.execute(_LAST, {"p_bank": bank_id}).scalar_one_or_none() or 0)


def serial_for(seq: int, bill_id: int) -> str:
    """A fresh serial per debit, unique per bank: the feed seq and the bill."""
    return f"AD-{seq}-{bill_id}"


def process_batch(engine: Engine, clock: Clock, bank_id: str, notices: Sequence[pb.BillNotice],
                  summary: Summary) -> pb.BillFeedRequest:
    """Debits and records one batch in one transaction; returns the message of results to send (each result
    added in place: building them first and the message from the list copied every result again)."""
    req = pb.BillFeedRequest()
    add = req.results.results.add
    now = clock.now()
    today = business_date(clock)
    with engine.begin() as conn:
        done = last_seq(conn, bank_id)
        old = [n for n in notices if n.seq <= done]
        new = sorted((n for n in notices if n.seq > done), key=lambda n: n.seq)
        stored = {r.seq: r for r in conn.execute(_STORED, {"p_bank": bank_id, "p_seqs": list_param(conn, [n.seq for n in old])})} \
            if old else {}
        for n in old:
            if n.seq in stored:
                r = stored[n.seq]
                add(seq=n.seq, amount_fen=r.amount_fen, bank_serial=r.bank_serial if r.outcome == DEBITED else "",
                    outcome=_OUTCOME_PB[r.outcome])
                summary.replayed += 1
        if not new:
            return req
        # Each notice's fields read once (a message field read costs about as much as the rule it feeds).
        fields_ = [(n.seq, n.bill_id, n.account_no, n.amount_fen, n.withdrawn) for n in new]
        balances = {r.account_no: int(r.balance_fen) for r in conn.execute(
            _BALANCES, {"p_bank": bank_id, "p_accts": list_param(conn, sorted({f[2] for f in fields_}))}).all()}
        per: dict[str, int] = {}  # debited per passbook
        d_serials, d_accts, d_amounts = [], [], []  # the debits (ledger rows)
        outcomes, serials = [], []  # every notice's result
        for seq, bill_id, acct, amount_fen, withdrawn in fields_:
            serial = f"AD-{seq}-{bill_id}"  # serial_for
            if not withdrawn and balances.get(acct, -1) >= amount_fen > 0:
                balances[acct] -= amount_fen
                per[acct] = per.get(acct, 0) + amount_fen
                d_serials.append(serial)
                d_accts.append(acct)
                d_amounts.append(amount_fen)
                outcomes.append(DEBITED)
                serials.append(serial)
            else:
                outcomes.append(NOT_DEBITED if withdrawn else INSUFFICIENT_FUNDS)
                serials.append("")
        if d_serials:
            _take(conn, bank_id, per)
            _insert_columns(conn, ledger.ledger, {
                "bank_id": bank_id, "channel": "AUTO_DEBIT", "outlet_code": "", "teller_id": "",
                "status": ledger.POSTED, "settlement_date": today, "receipt_no": "", "payment_id": "",
                "failure_reason": "", "created_at": now, "updated_at": now},
                {"bank_serial": d_serials, "account_no": d_accts, "amount_fen": d_amounts})
        seqs, bill_ids, accts, amounts, _w = map(list, zip(*fields_, strict=True))
        _insert_columns(conn, results_table, {"bank_id": bank_id, "processed_at": now}, {
            "seq": seqs, "bill_id": bill_ids, "account_no": accts, "amount_fen": amounts, "outcome": outcomes,
            "bank_serial": serials})
        if conn.execute(_MOVE, {"p_bank": bank_id, "p_seq": seqs[-1], "p_now": now}).rowcount != 1:
            conn.execute(cursor_table.insert(), {"bank_id": bank_id, "last_seq": seqs[-1], "updated_at": now})
        if any(b < 0 for b in balances.values()):
            raise RuntimeError("a passbook would go negative")
    summary.notices += len(new)
    summary.debited += len(d_serials)
    summary.debited_fen += sum(d_amounts)
    summary.insufficient += len(new) - len(d_serials)
    summary.last_seq = seqs[-1]
    for seq, amount_fen, serial, outcome in zip(seqs, amounts, serials, outcomes, strict=True):
        add(seq=seq, amount_fen=amount_fen, bank_serial=serial, outcome=_OUTCOME_PB[outcome])
    return req


class Consumer:
    def __init__(self, s: AutodebitSettings, engine: Engine, clock: Clock, channel: grpc.Channel) -> None:
        self.s = s
        self.engine = engine
        self.clock = clock
        self.stub = billing_pb2_grpc.BillingServiceStub(channel)
        self.summary = Summary(s.bank_id)
        self.stop = threading.Event()
        self.metadata = [(BANK_ID_METADATA, s.bank_id)] if s.insecure else []
        g0, g1, g2 = gc.get_threshold()
        if g0 < s.gc_gen0_threshold:  # only raised: the collector's young passes were a share of every batch
            gc.set_threshold(s.gc_gen0_threshold, g1, g2)

    def run(self) -> Summary:
        backoff_s = self.s.retry_backoff_base_s
        started = time.monotonic()
        while not self.stop.is_set():
            if self.s.run_timeout_s and time.monotonic() - started > self.s.run_timeout_s:
                raise TimeoutError(f"autodebit did not finish within {self.s.run_timeout_s} s")
            try:
                if self._stream():
                    return self.summary
                backoff_s = self.s.retry_backoff_base_s
            except grpc.RpcError as exc:
                log.info("event=feed_stream_ended code=%s retry_in_s=%.2f", exc.code().name, backoff_s)
            self.stop.wait(backoff_s)
            backoff_s = min(self.s.retry_backoff_cap_s, backoff_s * 2)
        return self.summary

    def _stream(self) -> bool:
        """One subscription; True when idle-exit is reached."""
        with self.engine.connect() as conn:
            resume = last_seq(conn, self.s.bank_id)
        out: queue.Queue[pb.BillFeedRequest | None] = queue.Queue(maxsize=self.s.results_queue_max)

        def requests() -> Iterator[pb.BillFeedRequest]:
            yield pb.BillFeedRequest(subscribe=pb.Subscribe(resume_after_seq=resume))
            yield from iter(out.get, None)

        call = self.stub.BillFeed(requests(), metadata=self.metadata)
        self.summary.streams += 1
        last_msg = [time.monotonic()]
        last_notice = time.monotonic()
        ended = threading.Event()

        def watchdog() -> None:
            while not ended.wait(min(1.0, self.s.silence_s / 4)):
                if time.monotonic() - last_msg[0] > self.s.silence_s or self.stop.is_set():
                    log.warning("event=feed_silent action=resubscribe")
                    call.cancel()
                    return

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            for msg in call:
                last_msg[0] = time.monotonic()
                if msg.WhichOneof("body") == "notices":
                    last_notice = time.monotonic()
                    results = process_batch(self.engine, self.clock, self.s.bank_id, msg.notices.notices,
                                            self.summary)
                    if results.results.results:
                        crash_point("bank.after_debit")
                        out.put(results)
                    continue
                self.summary.acked_through_seq = msg.heartbeat.acked_through_seq
                if (self.s.idle_exit_s and msg.heartbeat.acked_through_seq >= self.summary.last_seq
                        and self.summary.last_seq >= self.s.idle_exit_after_seq
                        and time.monotonic() - last_notice >= self.s.idle_exit_s):
                    return True
        finally:
            ended.set()
            with contextlib.suppress(queue.Full):
                out.put_nowait(None)
            call.cancel()
        return False


def demo_step(day: Any) -> None:
    """bank_sim demo-day's step after the counter business: the utility issues
    this month's bills (`mis_adapter issue-bills`), and the bank's auto-debit
    consumer takes its bills through the bridge until all are acknowledged."""
    from rich.table import Table

    from bank_sim.processes import run_command

    s = day.settings
    today = business_date(make_clock(s.clock_start))
    period = f"{today.year:04d}{today.month:02d}"
    issued_lines = []
    for db in day.mis_dbs():  # each branch database issues its own bills (the front merges their feeds)
        run_command("issue-bills", ["mis_adapter", "issue-bills", "--db", db, "--period", period,
                                    *day.clock_flags()], log_dir=day.work, timeout_s=s.step_timeout_s, cwd=REPO)
        issued_lines.append((day.work / "issue-bills.log").read_text(encoding="utf-8").strip().splitlines()[-1])
    issued = "; ".join(issued_lines)
    from bank_sim.link_ops import demo_paid_elsewhere
    demo_paid_elsewhere(day)  # a few fed bills paid at another bank first: their debits come back as refunds
    settings = load_settings(AutodebitSettings, {
        "target": day.servers["bridge"].grpc_addr, "bank_id": s.bank_id, "insecure": True, "db": day.bank_db,
        "clock_start": s.clock_start, "idle_exit_s": 1.0, "run_timeout_s": s.step_timeout_s})
    engine = make_engine(settings.db)
    create_schema(engine)
    roster = day.roster_dir / f"{s.bank_id}.csv"
    clock = make_clock(settings.clock_start)
    import random
    with engine.begin() as conn:
        ledger.load_passbooks(conn, s.bank_id, ledger.read_roster(roster), rng=random.Random(settings.seed),
                              low_balance_ratio=settings.low_balance_ratio, now=clock.now())
    prepare_engine(engine)
    channel = open_channel(settings.target, tls=None, insecure=True)
    try:
        summary = Consumer(settings, engine, clock, channel).run()
        with engine.connect() as conn:
            broken = ledger.check_passbooks(conn, s.bank_id)
    finally:
        channel.close()
        engine.dispose()
    table = Table(title=f"Bill issuance {period} and auto-debit (实时划拨) at {s.bank_id}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("yuan", justify="right")
    table.add_row("bills fed to the bank", f"{summary.notices:,}", "")
    table.add_row("debited from passbooks", f"{summary.debited:,}", f"{summary.debited_fen / 100:,.2f}")
    table.add_row("left in arrears (insufficient funds)", f"{summary.insufficient:,}", "")
    table.add_row("acknowledged by the utility (cursor)", f"{summary.acked_through_seq:,}", "")
    day.sections.append(table)
    day.facts["autodebit"] = {**asdict(summary), "issued": issued, "passbooks_broken": broken}
    day.console.print(f"  {issued}")
    day.console.print(f"  bills fed {summary.notices:,}, debited {summary.debited:,} "
                      f"({summary.debited_fen / 100:,.2f} yuan), left in arrears {summary.insufficient:,}")
    if broken:
        raise RuntimeError(f"{broken} passbooks out of balance after auto-debit")
    if summary.acked_through_seq < summary.last_seq:
        raise RuntimeError("auto-debit results not all acknowledged by the utility")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_sim autodebit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_flags(parser, AutodebitSettings)
    args = parser.parse_args(argv)
    s = load_settings(AutodebitSettings, args, args.config_file)
    setup_logging(s.log_level, "autodebit")
    crash_points.arm(s.crash_point)
    engine = make_engine(s.db)
    create_schema(engine)
    clock = make_clock(s.clock_start)
    if s.roster:
        import random
        with engine.begin() as conn:
            opened = ledger.load_passbooks(conn, s.bank_id, ledger.read_roster(s.roster), rng=random.Random(s.seed),
                                           low_balance_ratio=s.low_balance_ratio, now=clock.now())
        log.info("event=passbooks_opened count=%d", opened)
    prepare_engine(engine)
    tls = TlsFiles(s.tls_cert, s.tls_key, s.tls_ca) if s.tls_cert and s.tls_key and s.tls_ca else None
    channel = open_channel(s.target, tls=tls, insecure=s.insecure)
    consumer = Consumer(s, engine, clock, channel)
    try:
        summary = consumer.run()
    finally:
        channel.close()
        engine.dispose()
    with engine.connect() as conn:
        broken = ledger.check_passbooks(conn, s.bank_id)
    print(summary.line() + f" passbooks_broken={broken}", flush=True)
    if s.summary_json:
        Path(s.summary_json).write_text(json.dumps({**asdict(summary), "passbooks_broken": broken}))
    return 0 if broken == 0 else 1


__all__ = ["AutodebitSettings", "Consumer", "Summary", "create_schema", "prepare_engine", "process_batch", "serial_for",
           "main"]
