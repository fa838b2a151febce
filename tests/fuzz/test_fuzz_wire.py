"""Fuzzing every request of both servers (mis_adapter, and the bridge in front
of it), in process on SQLite, many cases per connection:

- structured requests of every RPC (BillingService on both servers,
  ReportService on mis_adapter), generated from the protobuf descriptors with
  hostile values mixed with plausible ones (real accounts, a small pool of
  serials so replays and conflicting replays happen);
- malformed bytes sent with a raw generic call to every method;
- stream misuse: Reconcile and BillFeed with missing headers, batches after
  the trailer, subscribes in the middle, unknown seqs.

For every case: no UNKNOWN or INTERNAL, no hang; every INVALID_ARGUMENT
names the field (google.rpc.ErrorInfo metadata `field`); a refused request
leaves the MIS's row counts (every table) and the bridge's journal unchanged.
The case counts add up to ≥ 10,000 (FUZZ_SCALE multiplies them)."""
from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.journal.schema import requests as bridge_journal
from bridge.serve import Bridge
from bridge.settings import BridgeSettings
from mis_adapter.db import metadata as mis_metadata
from tests.support.mis_data import NOON, BillSpec, RunningAdapter, add_account, running_adapter
from tests.support.proto_strategies import SERIAL_ALPHABET, messages
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc, report_pb2, report_pb2_grpc
from yindian_common.db import make_engine
from yindian_common.fields import make_account_no
from yindian_common.status import error_info

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
CALL_TIMEOUT_S = 10.0
FEED_TIMEOUT_S = 0.4          # a feed stream stays open by design: the client's deadline ends it
BANK = "ICBC"
SERIAL_POOL = [f"FZ-{i}" for i in range(24)]
# A feed stream's lease row comes and goes with the stream (released when an earlier,
# deadline-ended stream finishes); it is not data a request writes.
LEASE_TABLES = {"feed_leases"}
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
RECENT_CASES = 6              # named in a failure: a late write shows which earlier case made it

pytestmark = pytest.mark.timeout(600)


def cases(n: int) -> int:
    return max(1, int(n * SCALE))


@dataclass
class Tally:
    """What the fuzz saw, per (server, rpc): cases and status codes."""
    codes: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, key: str, code: grpc.StatusCode) -> None:
        by = self.codes.setdefault(key, {})
        by[code.name] = by.get(code.name, 0) + 1

    def total(self) -> int:
        return sum(sum(v.values()) for v in self.codes.values())


@dataclass
class World:
    adapter: RunningAdapter
    bridge: Bridge
    bridge_channel: grpc.Channel
    bridge_engine: sa.Engine
    accounts: list[str]
    tally: Tally = field(default_factory=Tally)
    last: tuple[int, ...] = ()
    hints: dict[str, st.SearchStrategy[Any]] | None = None
    _count_mis: Any = None
    pay_messages: st.SearchStrategy[Message] | None = None
    samples: dict[str, list[str]] = field(default_factory=dict)
    recent: list[str] = field(default_factory=list)  # the last RECENT_CASES cases, for a failure message
    desc: str = ""                                     # what the current case sends, as the run sets it

    def stub(self, server: str) -> Any:
        return billing_pb2_grpc.BillingServiceStub(self.channel(server))

    def channel(self, server: str) -> grpc.Channel:
        return self.adapter.channel if server == "mis" else self.bridge_channel

    def counts(self) -> tuple[int, ...]:
        if self._count_mis is None:  # one statement for every table, compiled once
            self._count_mis = sa.text("SELECT " + ", ".join(f"(SELECT count(*) FROM {t.name})"
                                                            for t in mis_metadata.sorted_tables
                                                            if t.name not in LEASE_TABLES))
        with self.adapter.engine.connect() as conn:
            mis = conn.execute(self._count_mis).one()
        with self.bridge_engine.connect() as conn:
            journal = conn.execute(sa.select(sa.func.count()).select_from(bridge_journal)).scalar_one()
        return (*mis, journal)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work: Path = tmp_path_factory.mktemp("fuzz")
    with running_adapter(f"sqlite:///{work / 'mis.db'}", sqlite_synchronous="NORMAL") as adapter:
        accounts = [add_account(adapter.engine, "01", i, [BillSpec("202610", 5_000 + 37 * i, dt.date(2026, 12, 20)),
                                                          BillSpec("202611", 4_000 + 11 * i, dt.date(2026, 12, 25))])
                    for i in range(1, 9)]
        accounts.append(add_account(adapter.engine, "02", 1, status="CLOSED"))
        bridge = Bridge(BridgeSettings(listen="127.0.0.1:0", upstream=adapter.address, bank_id=BANK, insecure=True,
                                       db=f"sqlite:///{work / 'bridge.db'}", resolver_enabled=False, grace_s=1.0,
                                       metrics_port=0, clock_start=NOON.isoformat(), sign_on_at_start=False,
                                       sqlite_synchronous="NORMAL"))
        bridge.start()
        ch = grpc.insecure_channel(bridge.address)
        engine = make_engine(f"sqlite:///{work / 'bridge.db'}", pool_size=1)
        w = World(adapter, bridge, ch, engine, accounts)
        w.last = w.counts()
        try:
            yield w
        finally:
            print(f"\nfuzz cases: {w.tally.total()}; by server.rpc and status:", dict(sorted(w.tally.codes.items())))
            print("sample refusals:", dict(sorted(w.samples.items())))
            ch.close()
            bridge.stop()
            engine.dispose()


# ---- plausible values, mixed into the hostile ones ----
def hints(w: World) -> dict[str, st.SearchStrategy[Any]]:
    if w.hints is None:
        w.hints = _hints(w)
    return w.hints


def _hints(w: World) -> dict[str, st.SearchStrategy[Any]]:
    bad_check = [a[:9] + str((int(a[9]) + 1) % 10) for a in w.accounts[:3]]
    serial = st.one_of(st.sampled_from(SERIAL_POOL), st.text(SERIAL_ALPHABET, min_size=1, max_size=32))
    day = st.sampled_from(["2026-11-28", "2026-11-27", "2026-11-29", "2026-10-01", "2026-02-30"])
    return {
        "account_no": st.sampled_from([*w.accounts, *bad_check, make_account_no("03", 42)]),
        "bank_serial": serial, "cancel_serial": serial, "original_serial": serial,
        "amount_fen": st.integers(1, 30_000), "outlet_code": st.sampled_from(["O1", "O2"]),
        "teller_id": st.sampled_from(["T1", "T2"]), "channel": st.integers(1, 4),
        "bank_balance_fen": st.integers(0, 100_000), "reason": st.just("customer request"),
        "settlement_date": day, "from_date": day, "to_date": day, "as_of_date": day,
        "branch_code": st.sampled_from(["01", "02", "99"]), "group_by": st.integers(1, 5),
        "status": st.integers(1, 2), "outcome": st.integers(1, 2), "seq": st.integers(0, 6),
        "resume_after_seq": st.integers(0, 6), "record_count": st.integers(0, 4),
        "total_fen": st.integers(0, 60_000),
    }


BANK_MD = st.sampled_from([BANK, BANK, BANK, BANK, "ABC", "NOSUCHBANK", None])


def metadata_for(bank: str | None) -> list[tuple[str, str]]:
    return [] if bank is None else [("x-yindian-bank-id", bank)]


# ---- the checks ----
def check(w: World, key: str, request_fields: Sequence[str], call: Callable[[], object], *,
          open_stream: bool = False) -> None:
    """Run one case; hold the rules whatever the answer."""
    before = w.last
    code, details = grpc.StatusCode.OK, ""
    try:
        call()
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details() or ""  # type: ignore[attr-defined]
        assert code not in FORBIDDEN, f"{key}: {code.name} {details!r}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            assert open_stream, f"{key}: hung until the deadline"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            info = error_info(exc)
            named = info.metadata.get("field", "") if info is not None else ""
            assert named, f"{key}: INVALID_ARGUMENT without a field: {details!r}"
    after = w.last = w.counts()
    w.recent = [*w.recent[-RECENT_CASES + 1:], f"{time.monotonic():.3f} {key} {code.name} {details[:80]!r} {w.desc}"]
    w.tally.add(key, code)
    if code != grpc.StatusCode.OK and len(w.samples.setdefault(f"{key}.{code.name}", [])) < 3:
        w.samples[f"{key}.{code.name}"].append(details[:120])
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert after[:-1] == before[:-1], (f"{key}: refused ({code.name}) yet MIS rows changed; the last cases:\n"
                                           + "\n".join(w.recent))
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert after[-1] == before[-1], f"{key}: refused ({code.name}) yet the bridge journaled it"


def ran(w: World, n: int, run: Callable[[], None]) -> None:
    """Run a hypothesis test and hold that it really ran its n cases (it may skip a few duplicates)."""
    before = w.tally.total()
    run()
    assert w.tally.total() - before >= n * 0.9, (w.tally.total() - before, n)


def _unary_methods(service: str) -> dict[str, type[Message]]:
    """Every unary method of the service (read from the descriptor: a new RPC is fuzzed without a change here)."""
    from google.protobuf import message_factory
    desc = pb.DESCRIPTOR.services_by_name[service]
    return {m.name: message_factory.GetMessageClass(m.input_type) for m in desc.methods
            if not m.client_streaming and not m.server_streaming}


UNARY = _unary_methods("BillingService")
REPORT_UNARY = {"CollectionSummary": report_pb2.CollectionSummaryRequest,
                "ArrearsSummary": report_pb2.ArrearsSummaryRequest}


def _unary_cases(w: World) -> st.SearchStrategy[tuple[str, str, Message, str | None]]:
    h = hints(w)
    per_rpc = [st.tuples(st.just(server), st.just(rpc), messages(cls, h), BANK_MD)
               for server in ("mis", "bridge") for rpc, cls in UNARY.items()]
    return st.one_of(*per_rpc)


def test_fuzz_unary_billing_on_both_servers(world: World) -> None:
    n = cases(5_000)

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_unary_cases(world))
    def run(case: tuple[str, str, Message, str | None]) -> None:
        server, rpc, request, bank = case
        fn = getattr(world.stub(server), rpc)
        check(world, f"{server}.{rpc}", [f.name for f in request.DESCRIPTOR.fields],
              lambda: fn(request, timeout=CALL_TIMEOUT_S, metadata=metadata_for(bank)))

    ran(world, n, run)
    posted = world.tally.codes.get("mis.Pay", {}).get("OK", 0) + world.tally.codes.get("bridge.Pay", {}).get("OK", 0)
    assert posted > 0, "the fuzz never got past validation: the hints are wrong"


def test_fuzz_reports(world: World) -> None:
    n = cases(800)
    h = hints(world)
    report = report_pb2_grpc.ReportServiceStub(world.adapter.channel)
    strategy = st.one_of(*[st.tuples(st.just(rpc), messages(cls, h), BANK_MD) for rpc, cls in REPORT_UNARY.items()],
                         st.tuples(st.just("ArrearsDetail"), messages(report_pb2.ArrearsDetailRequest, h), BANK_MD))

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case: tuple[str, Message, str | None]) -> None:
        rpc, request, bank = case
        fn = getattr(report, rpc)
        if rpc == "ArrearsDetail":
            def call() -> object:
                return list(fn(request, timeout=CALL_TIMEOUT_S, metadata=metadata_for(bank)))
        else:
            def call() -> object:
                return fn(request, timeout=CALL_TIMEOUT_S, metadata=metadata_for(bank))
        check(world, f"mis.{rpc}", [f.name for f in request.DESCRIPTOR.fields], call)

    ran(world, n, run)


RAW_METHODS = [("mis", f"/yindian.v1.BillingService/{m}") for m in UNARY] + \
              [("bridge", f"/yindian.v1.BillingService/{m}") for m in UNARY] + \
              [("mis", f"/yindian.v1.ReportService/{m}") for m in REPORT_UNARY]


def pay_messages(w: World) -> st.SearchStrategy[Message]:
    if w.pay_messages is None:
        w.pay_messages = messages(pb.PayRequest, hints(w))
    return w.pay_messages


@st.composite
def malformed(draw: st.DrawFn, w: World) -> bytes:
    """Random bytes, or a valid request truncated, bit-flipped or with junk appended."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(min_size=1, max_size=120))
    valid = draw(pay_messages(w)).SerializeToString()
    if kind == 1 and len(valid) > 1:
        return valid[:draw(st.integers(1, len(valid) - 1))]
    if kind == 2 and valid:
        i = draw(st.integers(0, len(valid) - 1))
        return valid[:i] + bytes([valid[i] ^ (1 << draw(st.integers(0, 7)))]) + valid[i + 1:]
    return valid + draw(st.binary(min_size=1, max_size=16))


def test_fuzz_malformed_bytes_on_every_method(world: World) -> None:
    n = cases(2_000)

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(RAW_METHODS), malformed(world), BANK_MD)
    def run(method: tuple[str, str], raw: bytes, bank: str | None) -> None:
        server, path = method
        call = world.channel(server).unary_unary(path)  # bytes in, bytes out: no serializer
        check(world, f"{server}.raw{path.rsplit('/', 1)[1]}", [],
              lambda: call(raw, timeout=CALL_TIMEOUT_S, metadata=metadata_for(bank)))

    ran(world, n, run)


STREAM_METHODS = [(server, f"/yindian.v1.BillingService/{m}", first)
                  for server in ("mis", "bridge")
                  for m, first in (("Reconcile", pb.ReconcileRequest(header=pb.ReconcileHeader(
                      settlement_date="2026-11-28"))), ("BillFeed", pb.BillFeedRequest(subscribe=pb.Subscribe())))]


def test_fuzz_malformed_bytes_in_streams(world: World) -> None:
    n = cases(300)

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(STREAM_METHODS), malformed(world), st.booleans())
    def run(method: tuple[str, str, Message], raw: bytes, first_valid: bool) -> None:
        server, path, first = method
        call = world.channel(server).stream_stream(path)
        stream = [first.SerializeToString(), raw] if first_valid else [raw]
        world.desc = repr(stream)
        check(world, f"{server}.raw{path.rsplit('/', 1)[1]}", [],
              lambda: list(call(iter(stream), timeout=FEED_TIMEOUT_S if "Feed" in path else CALL_TIMEOUT_S,
                                metadata=metadata_for(BANK))), open_stream="Feed" in path)

    ran(world, n, run)


@st.composite
def reconcile_streams(draw: st.DrawFn, w: World) -> list[pb.ReconcileRequest]:
    """Mostly shaped like a real stream (header, batches, trailer) with misuse
    mixed in: no header, a second header, batches after the trailer, or any
    sequence at all."""
    h = hints(w)
    any_msg = messages(pb.ReconcileRequest, h)
    if draw(st.integers(0, 3)) == 0:
        return draw(st.lists(any_msg, max_size=6))
    header = pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=draw(h["settlement_date"])))
    batches = [pb.ReconcileRequest(batch=b) for b in draw(st.lists(messages(pb.BankRecordBatch, h), max_size=3))]
    records = [r for b in batches for r in b.batch.records]
    trailer = pb.ReconcileRequest(trailer=pb.ReconcileTrailer(
        record_count=len(records), total_fen=max(-(2**63), min(2**63 - 1, sum(r.amount_fen for r in records)))))
    if draw(st.booleans()):
        trailer = draw(messages(pb.ReconcileRequest, h).filter(lambda m: m.WhichOneof("body") == "trailer")
                       | st.just(trailer))
    stream: list[pb.ReconcileRequest] = []
    if draw(st.integers(0, 5)) > 0:
        stream.append(header)
    stream.extend(batches)
    if draw(st.booleans()):
        stream.append(trailer)
    if draw(st.integers(0, 4)) == 0:
        stream.extend(draw(st.lists(any_msg, min_size=1, max_size=2)))  # after the trailer / a second header
    return stream


def test_fuzz_reconcile_streams(world: World) -> None:
    n = cases(1_600)

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["mis", "bridge"]), reconcile_streams(world), BANK_MD)
    def run(server: str, stream: list[pb.ReconcileRequest], bank: str | None) -> None:
        stub = world.stub(server)
        world.desc = repr(stream)[:300]
        check(world, f"{server}.Reconcile", [],
              lambda: list(stub.Reconcile(iter(stream), timeout=CALL_TIMEOUT_S, metadata=metadata_for(bank))))

    ran(world, n, run)


@st.composite
def feed_streams(draw: st.DrawFn, w: World) -> list[pb.BillFeedRequest]:
    """Results before subscribing, a second subscribe, unknown seqs, wrong amounts."""
    h = hints(w)
    any_msg = messages(pb.BillFeedRequest, h)
    stream = draw(st.lists(any_msg, min_size=0, max_size=4))
    if draw(st.booleans()):
        stream.insert(0, pb.BillFeedRequest(subscribe=pb.Subscribe()))
    return stream


def test_fuzz_bill_feed_streams(world: World) -> None:
    n = cases(400)

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["mis", "bridge"]), feed_streams(world), st.sampled_from(["ABC", "ICBC"]))
    def run(server: str, stream: list[pb.BillFeedRequest], bank: str) -> None:
        stub = world.stub(server)
        check(world, f"{server}.BillFeed", [],
              lambda: list(stub.BillFeed(iter(stream), timeout=FEED_TIMEOUT_S, metadata=metadata_for(bank))),
              open_stream=True)

    ran(world, n, run)
