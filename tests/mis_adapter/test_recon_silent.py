"""A bank that goes silent in the middle of its Reconcile stream holds a
database connection (on PostgreSQL a COPY in progress, which no
idle-in-transaction timeout ends and which blocks every DROP DATABASE on the
server). mis_adapter ends such a stream once the bank has sent nothing for
`recon_peer_silence_s` (DEADLINE_EXCEEDED RECON_PEER_SILENT), exactly as a
cancelled stream: nothing of the day applied, the COPY abandoned, the day
still open to cancels and reconciled normally by a later complete stream.
Only the silence between messages is bounded, not the stream's length."""
from __future__ import annotations

import datetime as dt
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa

from tests.support.mis_data import TODAY, BillSpec, RunningAdapter, add_account, running_adapter
from tests.support.waiting import wait_until
from yindian.v1 import billing_pb2 as pb
from yindian_common.status import error_info

pytestmark = [pytest.mark.timeout(180), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema
SILENCE_S = 2.0
CALL_TIMEOUT_S = 60.0  # far past the bound: without it, the call ends on the client's deadline instead
P, C = pb.BANK_RECORD_STATUS_POSTED, pb.BANK_RECORD_STATUS_CANCELLED


def header() -> pb.ReconcileRequest:
    return pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=TODAY.isoformat()))


def batch(*records: tuple[str, str, int, int]) -> pb.ReconcileRequest:
    return pb.ReconcileRequest(batch=pb.BankRecordBatch(records=[
        pb.BankRecord(bank_serial=s, account_no=acct, amount_fen=fen, status=st) for s, acct, fen, st in records]))


def two_payments(a: RunningAdapter) -> tuple[str, str]:
    accts = tuple(add_account(a.engine, "01", n, [BillSpec("202610", 50_000, dt.date(2026, 12, 10))])
                  for n in (1, 2))
    for serial, acct, fen in (("P-1", accts[0], 1_000), ("P-2", accts[1], 2_000)):
        a.stub.Pay(pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=fen, outlet_code="0101",
                                 teller_id="T1", channel=pb.CHANNEL_COUNTER), metadata=a.md(), timeout=30)
    return accts[0], accts[1]


def receivers_alive() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("recon-receive-"))


def copying_backends(a: RunningAdapter) -> int:
    if a.engine.dialect.name != "postgresql":
        return 0
    with a.engine.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND query ILIKE 'COPY%' AND state <> 'idle'")).scalar_one())


def test_a_bank_silent_mid_stream_is_ended_and_nothing_of_the_day_is_applied(db_url: str) -> None:
    with running_adapter(db_url, recon_peer_silence_s=SILENCE_S) as a:
        acct1, acct2 = two_payments(a)
        sent: queue.Queue[pb.ReconcileRequest | None] = queue.Queue()
        sent.put(header())
        sent.put(batch(("P-1", acct1, 1_000, P)))
        # ... and then nothing: the bank's stream stays open and silent.
        call = a.stub.Reconcile(iter(sent.get, None), metadata=a.md(), timeout=CALL_TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        waited_s = time.monotonic() - started
        sent.put(None)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        info = error_info(err.value)
        assert info is not None and info.reason == "RECON_PEER_SILENT", err.value.details()
        assert "nothing of the day was applied" in err.value.details()
        assert waited_s < CALL_TIMEOUT_S / 2, f"the stream ended after {waited_s:.1f} s"

        # Nothing applied: no COPY left, no receiver left, the day open, its payments still cancellable.
        wait_until(lambda: copying_backends(a) == 0, "the abandoned COPY to end")
        wait_until(lambda: receivers_alive() == 0, "the stream's receiving thread to end")
        with a.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM reconciled_days")).scalar_one() == 0
        got = a.stub.Cancel(pb.CancelRequest(cancel_serial="C-2", original_serial="P-2", amount_fen=2_000),
                            metadata=a.md(), timeout=30)
        assert got.outcome == pb.CANCEL_OUTCOME_REVERSED

        # The complete stream of the day then reconciles it, with the right summary.
        out = list(a.stub.Reconcile(iter([header(), batch(("P-1", acct1, 1_000, P), ("P-2", acct2, 2_000, C))]),
                                    metadata=a.md(), timeout=CALL_TIMEOUT_S))
        summary = out[-1].summary
        assert not summary.replayed and summary.record_count == 2 and summary.net_settlement_fen == 1_000
        totals = {t.outcome: (t.count, t.amount_fen) for t in summary.totals}
        assert totals[pb.RECONCILE_OUTCOME_MATCHED][0] == 2
        with pytest.raises(grpc.RpcError) as err:
            a.stub.Cancel(pb.CancelRequest(cancel_serial="C-1", original_serial="P-1", amount_fen=1_000),
                          metadata=a.md(), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_stream_longer_than_the_bound_but_never_silent_that_long_reconciles(db_url: str) -> None:
    with running_adapter(db_url, recon_peer_silence_s=SILENCE_S) as a:
        acct1, acct2 = two_payments(a)

        def paced() -> Iterator[pb.ReconcileRequest]:
            yield header()
            for msg in (batch(("P-1", acct1, 1_000, P)), batch(("P-2", acct2, 2_000, P)),
                        pb.ReconcileRequest(trailer=pb.ReconcileTrailer(record_count=2, total_fen=3_000))):
                time.sleep(SILENCE_S / 2)  # the pace under test (not synchronisation): 1.5 bounds in all
                yield msg

        out = list(a.stub.Reconcile(paced(), metadata=a.md(), timeout=CALL_TIMEOUT_S))
        summary = out[-1].summary
        assert not summary.replayed and summary.record_count == 2 and summary.net_settlement_fen == 3_000
        wait_until(lambda: receivers_alive() == 0, "the stream's receiving thread to end")
