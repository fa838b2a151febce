"""ExchangeControlTotals on an in-process mis_adapter, on SQLite, PostgreSQL
and MariaDB: the utility's control totals of a bank's settlement date count
its pays (standing and reversed) posted before the cutoff, leave out the
in-doubt serials, bill-feed debits, reconciliation postings, tombstones and
other banks; the listing pages through the same set; a reconciled day says
so; a malformed request is INVALID_ARGUMENT naming its field and writes
nothing; a persisting divergence sets the gauge."""
from __future__ import annotations

import datetime as dt

import grpc
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from mis_adapter.db.core import Payment
from mis_adapter.db.feed import DebitResultRow
from mis_adapter.db.recon import ReconciledDay
from tests.support.mis_data import NOON, TODAY, add_account, row_counts, running_adapter
from yindian.v1 import billing_pb2 as pb
from yindian_common.status import error_info

pytestmark = [pytest.mark.timeout(180), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema

UTC_NOON = NOON.astimezone(dt.UTC)


def _pay(ra, serial: str, acct: str, amount_fen: int, bank: str = "ICBC") -> None:  # type: ignore[no-untyped-def]
    ra.stub.Pay(pb.PayRequest(bank_serial=serial, account_no=acct, amount_fen=amount_fen, outlet_code="O1",
                              teller_id="T1", channel=pb.CHANNEL_COUNTER), timeout=10, metadata=ra.md(bank))


def _request(cutoff: dt.datetime, **kw: object) -> pb.ExchangeControlTotalsRequest:
    req = pb.ExchangeControlTotalsRequest(settlement_date=TODAY.isoformat(), **kw)  # type: ignore[arg-type]
    req.posted_before.FromDatetime(cutoff)
    return req


def _side_rows(engine: sa.Engine, acct: str) -> None:
    """A bill-feed debit and a reconciliation (BANK_ONLY) posting: the bridge journals neither."""
    common = {"bank_id": "ICBC", "state": "POSTED", "account_no": acct, "branch_code": "01", "outlet_code": "",
              "teller_id": "", "bank_balance_fen": None, "settlement_date": TODAY, "posted_at": UTC_NOON,
              "arrears_after_fen": 0, "prepaid_after_fen": 0, "prepaid_added_fen": 0}
    with engine.begin() as conn:
        conn.execute(sa.insert(Payment.__table__), [
            {**common, "bank_serial": "FEED-1", "amount_fen": 7_000, "channel": "AUTO_DEBIT"},
            {**common, "bank_serial": "RECON-1", "amount_fen": 8_000, "channel": "RECONCILE"}])
        conn.execute(sa.insert(DebitResultRow.__table__).values(
            bank_id="ICBC", seq=1, outcome="DEBITED", bank_serial="FEED-1", amount_fen=7_000, bill_id=1,
            account_no=acct, disposition="POSTED", received_at=UTC_NOON))


def test_utility_totals_count_exactly_the_bridges_pays(db_url: str) -> None:
    with running_adapter(db_url, control_totals_window_s=0.0) as ra:
        acct = add_account(ra.engine, "01", 1)
        for i, amount in enumerate((1_000, 2_000, 3_000, 4_000)):
            _pay(ra, f"P{i}", acct, amount)
        ra.stub.Cancel(pb.CancelRequest(cancel_serial="C0", original_serial="P1", amount_fen=2_000, reason="x"),
                       timeout=10, metadata=ra.md())
        ra.stub.Cancel(pb.CancelRequest(cancel_serial="C9", original_serial="NEVER", amount_fen=5, reason="x"),
                       timeout=10, metadata=ra.md())  # a tombstone: not a pay
        _pay(ra, "OTHER-BANK", acct, 9_000, bank="ABC")
        _side_rows(ra.engine, acct)
        ra.clock.advance(dt.timedelta(seconds=10))
        _pay(ra, "LATE", acct, 500)  # posted after the cutoff below
        ra.stub.Cancel(pb.CancelRequest(cancel_serial="C2", original_serial="P2", amount_fen=3_000, reason="x"),
                       timeout=10, metadata=ra.md())  # reversed after the cutoff: still posted as of it
        cutoff = UTC_NOON + dt.timedelta(seconds=5)
        before = row_counts([ra.engine])

        resp = ra.stub.ExchangeControlTotals(_request(cutoff), timeout=10, metadata=ra.md())
        assert resp.totals == pb.ControlTotals(posted_count=3, posted_fen=8_000, reversed_count=1, reversed_fen=2_000)
        assert not resp.reconciled

        doubt = ra.stub.ExchangeControlTotals(_request(cutoff, in_doubt_serials=["P3", "P1", "UNKNOWN"]),
                                              timeout=10, metadata=ra.md())
        assert doubt.totals == pb.ControlTotals(posted_count=2, posted_fen=4_000)

        listed, after = [], ""
        for _page in range(10):
            page = ra.stub.ExchangeControlTotals(_request(cutoff, list_max=1, list_after_serial=after), timeout=10,
                                                 metadata=ra.md())
            listed += [(e.bank_serial, e.amount_fen, e.reversed) for e in page.entries]
            after = page.next_after_serial
            if not after:
                break
        assert listed == [("P0", 1_000, False), ("P1", 2_000, True), ("P2", 3_000, False), ("P3", 4_000, False)]
        assert row_counts([ra.engine]) == before  # read-only
        later = ra.stub.ExchangeControlTotals(_request(UTC_NOON + dt.timedelta(seconds=11)), timeout=10,
                                              metadata=ra.md())
        assert later.totals == pb.ControlTotals(posted_count=3, posted_fen=5_500, reversed_count=2, reversed_fen=5_000)

        with ra.engine.begin() as conn:
            conn.execute(sa.insert(ReconciledDay.__table__).values(bank_id="ICBC", settlement_date=TODAY,
                                                                   reconciled_at=UTC_NOON, summary_json=""))
        assert ra.stub.ExchangeControlTotals(_request(cutoff), timeout=10, metadata=ra.md()).reconciled


def _refused_field(ra, req: pb.ExchangeControlTotalsRequest) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        ra.stub.ExchangeControlTotals(req, timeout=10, metadata=ra.md())
    info = error_info(e.value)  # type: ignore[arg-type]
    return e.value.code(), info.metadata.get("field", "") if info else ""  # type: ignore[attr-defined]


def test_malformed_exchanges_name_their_field_and_change_nothing(sqlite_url: str) -> None:
    with running_adapter(sqlite_url, control_totals_in_doubt_max=3, control_totals_list_max=5) as ra:
        before = row_counts([ra.engine])
        good = _request(UTC_NOON)
        cases = {
            "settlement_date": pb.ExchangeControlTotalsRequest(settlement_date="2026-13-01",
                                                               posted_before=good.posted_before),
            "posted_before": pb.ExchangeControlTotalsRequest(settlement_date=TODAY.isoformat()),
            "in_doubt_serials": _request(UTC_NOON, in_doubt_serials=["A", "B", "C", "D"]),
            "list_max": _request(UTC_NOON, list_max=6),
            "list_after_serial": _request(UTC_NOON, list_max=1, list_after_serial="no spaces"),
            "totals.posted_fen": _request(UTC_NOON, totals=pb.ControlTotals(posted_fen=-1)),
            "differing_serials": _request(UTC_NOON, differing_serials=["S"] * 11),
        }
        for field, req in cases.items():
            assert _refused_field(ra, req) == (grpc.StatusCode.INVALID_ARGUMENT, field), field
        assert row_counts([ra.engine]) == before


def test_a_persisting_divergence_sets_the_utilitys_gauge(sqlite_url: str) -> None:
    with running_adapter(sqlite_url, control_totals_window_s=30.0) as ra:
        acct = add_account(ra.engine, "01", 1)
        _pay(ra, "P0", acct, 1_000)
        cutoff = UTC_NOON + dt.timedelta(seconds=1)
        bridge_says = pb.ControlTotals(posted_count=1, posted_fen=900)  # 100 fen short

        def gauge() -> float | None:
            return REGISTRY.get_sample_value("yindian_control_total_divergence_fen", {"bank": "ICBC"})

        ra.stub.ExchangeControlTotals(_request(cutoff, totals=bridge_says), timeout=10, metadata=ra.md())
        assert gauge() == 0.0  # one observation is not an alarm
        ra.clock.advance(dt.timedelta(seconds=31))
        ra.stub.ExchangeControlTotals(_request(cutoff, totals=bridge_says), timeout=10, metadata=ra.md())
        assert gauge() == 100.0
        ra.stub.ExchangeControlTotals(_request(cutoff, totals=pb.ControlTotals(posted_count=1, posted_fen=1_000)),
                                      timeout=10, metadata=ra.md())
        assert gauge() == 0.0
