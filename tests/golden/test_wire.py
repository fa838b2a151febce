"""Golden wire transcripts: what crosses the link for a Pay, its replay, a
Cancel, a Reconcile and a BillFeed exchange against a real in-process
mis_adapter (127.0.0.1:0, SQLite, a manual clock), each message in protobuf
text format. Any change to the bytes on the wire shows up as a snapshot diff
to review (`pytest tests/golden --snapshot-update` after deciding it is right).

Nothing needs normalising today: the manual clock fixes every timestamp
(posted_at, issued_at, sent_at, reconciled_at) and the fresh database every
id (payment_id, receipt_no, bill_id, seq); a field that ever varies between
runs must be normalised in `_text`, not dropped. What is timing, not
contract, is left out: notices are recorded one by one (how many share a
message depends on when they are polled) and heartbeats only as the first
one whose cursor covers the results sent."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.message import Message
from grpc_status import rpc_status
from syrupy.assertion import SnapshotAssertion

from mis_adapter.bench_data import populate_period
from mis_adapter.issue_bills import issue_bills
from tests.mis_adapter.test_feed_support import RawFeed, debited, insufficient
from tests.support.mis_data import NOON, BillSpec, RunningAdapter, add_account, running_adapter
from yindian.v1 import billing_pb2 as pb

pytestmark = pytest.mark.timeout(120)

PERIOD = "202611"
FAST_FEED = {"feed_heartbeat_s": 0.1, "feed_lease_ttl_s": 5.0, "feed_poll_interval_s": 0.05}
HEARTBEATS_MAX = 1_000


def _text(msg: Message) -> str:
    return text_format.MessageToString(msg, as_utf8=True).rstrip() or "<empty>"


class Transcript:
    """The exchange as lines: `>>> Rpc Request` / `<<< Rpc Response` then the message."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def sent(self, rpc: str, msg: Message) -> None:
        self.lines.append(f">>> {rpc} {type(msg).__name__}\n{_text(msg)}")

    def received(self, rpc: str, msg: Message) -> None:
        self.lines.append(f"<<< {rpc} {type(msg).__name__}\n{_text(msg)}")

    def failed(self, rpc: str, err: grpc.RpcError) -> None:
        """The status with its details (google.rpc.Status: ErrorInfo and the like)."""
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        body = _text(status) if status is not None else f"code: {err.code().value[0]}\nmessage: {err.details()!r}"
        self.lines.append(f"<<< {rpc} status {err.code().name}\n{body}")

    def __str__(self) -> str:
        return "\n\n".join(self.lines) + "\n"


@pytest.fixture
def adapter(tmp_path: Path) -> Iterator[RunningAdapter]:
    with running_adapter(f"sqlite:///{tmp_path / 'mis.db'}", **FAST_FEED) as ra:
        yield ra


def _account(ra: RunningAdapter, serial: int) -> str:
    return add_account(ra.engine, "01", serial, [BillSpec("202610", 12_345, dt.date(2026, 11, 20)),
                                                 BillSpec("202611", 6_789, dt.date(2026, 12, 20))])


def _pay(ra: RunningAdapter, t: Transcript, req: pb.PayRequest) -> pb.PayResponse:
    t.sent("Pay", req)
    resp = ra.stub.Pay(req, metadata=ra.md())
    t.received("Pay", resp)
    return resp


def test_pay_and_its_replay(adapter: RunningAdapter, snapshot: SnapshotAssertion) -> None:
    t = Transcript()
    acct = _account(adapter, 17)
    req = pb.PayRequest(bank_serial="G-PAY-1", account_no=acct, amount_fen=20_000, outlet_code="O1",
                        teller_id="T1", channel=pb.CHANNEL_COUNTER, bank_balance_fen=500_000)
    first = _pay(adapter, t, req)
    adapter.clock.advance(dt.timedelta(minutes=5))
    replay = _pay(adapter, t, req)  # the same serial and parameters: the first answer again
    assert replay == first
    changed = pb.PayRequest()
    changed.CopyFrom(req)
    changed.amount_fen = 20_001
    t.sent("Pay", changed)
    with pytest.raises(grpc.RpcError) as err:
        adapter.stub.Pay(changed, metadata=adapter.md())
    t.failed("Pay", err.value)
    assert str(t) == snapshot


def test_cancel(adapter: RunningAdapter, snapshot: SnapshotAssertion) -> None:
    t = Transcript()
    acct = _account(adapter, 18)
    _pay(adapter, t, pb.PayRequest(bank_serial="G-PAY-2", account_no=acct, amount_fen=5_000, outlet_code="O1",
                                   teller_id="T1", channel=pb.CHANNEL_COUNTER))
    for req in (pb.CancelRequest(cancel_serial="G-CAN-2", original_serial="G-PAY-2", amount_fen=5_000,
                                 reason="teller error"),
                pb.CancelRequest(cancel_serial="G-CAN-9", original_serial="G-NEVER", amount_fen=800,
                                 reason="overtook its pay")):
        t.sent("Cancel", req)
        t.received("Cancel", adapter.stub.Cancel(req, metadata=adapter.md()))
    get = pb.GetPaymentRequest(bank_serial="G-PAY-2")
    t.sent("GetPayment", get)
    t.received("GetPayment", adapter.stub.GetPayment(get, metadata=adapter.md()))
    assert str(t) == snapshot


def test_reconcile(adapter: RunningAdapter, snapshot: SnapshotAssertion) -> None:
    t = Transcript()
    a, b, c = (_account(adapter, n) for n in (21, 22, 23))
    day = _pay(adapter, t, pb.PayRequest(bank_serial="G-R-1", account_no=a, amount_fen=1_000, outlet_code="O1",
                                         teller_id="T1", channel=pb.CHANNEL_COUNTER)).settlement_date
    _pay(adapter, t, pb.PayRequest(bank_serial="G-R-2", account_no=b, amount_fen=2_000, outlet_code="O1",
                                   teller_id="T1", channel=pb.CHANNEL_COUNTER))
    _pay(adapter, t, pb.PayRequest(bank_serial="G-R-3", account_no=c, amount_fen=3_000, outlet_code="O1",
                                   teller_id="T1", channel=pb.CHANNEL_COUNTER))
    records = [pb.BankRecord(bank_serial="G-R-1", account_no=a, amount_fen=1_000, status=pb.BANK_RECORD_STATUS_POSTED),
               pb.BankRecord(bank_serial="G-R-2", account_no=b, amount_fen=2_500, status=pb.BANK_RECORD_STATUS_POSTED),
               pb.BankRecord(bank_serial="G-R-4", account_no=c, amount_fen=400, status=pb.BANK_RECORD_STATUS_POSTED)]
    requests = [pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=day)),
                pb.ReconcileRequest(batch=pb.BankRecordBatch(records=records)),
                pb.ReconcileRequest(trailer=pb.ReconcileTrailer(record_count=3, total_fen=3_900))]
    for req in requests:
        t.sent("Reconcile", req)
    adapter.clock.advance(dt.timedelta(hours=1))
    for resp in adapter.stub.Reconcile(iter(requests), metadata=adapter.md(), timeout=60):
        t.received("Reconcile", resp)
    assert str(t) == snapshot


def test_bill_feed(adapter: RunningAdapter, snapshot: SnapshotAssertion) -> None:
    t = Transcript()
    populate_period(adapter.engine, 3, PERIOD, now=NOON, with_banks=False, rng_seed=3)
    issue_bills(adapter.engine, adapter.clock, PERIOD)
    t.sent("BillFeed", pb.BillFeedRequest(subscribe=pb.Subscribe()))
    feed = RawFeed(adapter.stub)
    notices = feed.notices(3)
    for n in notices:
        t.received("BillFeed", pb.BillFeedResponse(notices=pb.NoticeBatch(notices=[n])))
    results = pb.BillFeedRequest(results=pb.DebitResultBatch(
        results=[debited(notices[0]), debited(notices[1]), insufficient(notices[2])]))
    t.sent("BillFeed", results)
    feed.send_raw(results)
    for _ in range(HEARTBEATS_MAX):  # the first heartbeat whose cursor covers the three results
        msg = feed.next_message()
        if msg.WhichOneof("body") == "heartbeat" and msg.heartbeat.acked_through_seq >= 3:
            t.received("BillFeed", msg)
            break
    else:
        raise AssertionError("the cursor never reached 3")
    feed.close()
    assert str(t) == snapshot

