"""Issue 9 item 7: ReportService checks who is calling. A bank sees only its own
collections; arrears and household detail are for the utility's operators;
anyone else gets PERMISSION_DENIED, audited (log event and counter). In plain
text the identity is call metadata; under mTLS only the certificate counts."""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from prometheus_client import REGISTRY

from mis_adapter.serve import build_server
from mis_adapter.settings import AdapterSettings
from tests.support.mis_data import BANKS, NOON, BillSpec, RunningAdapter, add_account, add_bank, running_adapter
from yindian.v1 import billing_pb2 as bpb
from yindian.v1 import report_pb2 as pb
from yindian.v1 import report_pb2_grpc
from yindian_common.clock import ManualClock
from yindian_common.status import error_info

pytestmark = [pytest.mark.timeout(120), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema
DAY = "2026-11-28"
OPERATOR = "ops-zhang"
DENIED = grpc.StatusCode.PERMISSION_DENIED


def _pay(a: RunningAdapter, bank: str, serial: str, account: str, fen: int, outlet: str) -> None:
    a.stub.Pay(bpb.PayRequest(bank_serial=serial, account_no=account, amount_fen=fen, outlet_code=outlet,
                              teller_id="T1", channel=bpb.CHANNEL_COUNTER), metadata=a.md(bank), timeout=10)


@pytest.fixture
def adapter(sqlite_url: str) -> Iterator[tuple[RunningAdapter, report_pb2_grpc.ReportServiceStub]]:
    with running_adapter(sqlite_url, operators=[OPERATOR]) as a:
        acct1 = add_account(a.engine, "01", 1, [BillSpec("202610", 10_000, dt.date(2026, 11, 25))])
        acct2 = add_account(a.engine, "02", 2, [BillSpec("202610", 20_000, dt.date(2026, 11, 25))])
        _pay(a, "ICBC", "I1", acct1, 3_000, "ICBC-OUT1")
        _pay(a, "ABC", "A1", acct2, 7_000, "ABC-OUT9")
        yield a, report_pb2_grpc.ReportServiceStub(a.channel)


def _summary(stub: report_pb2_grpc.ReportServiceStub, md: list[tuple[str, str]] | None,
             by: int = pb.GROUP_BY_BANK) -> pb.CollectionSummaryResponse:
    return stub.CollectionSummary(pb.CollectionSummaryRequest(from_date=DAY, to_date=DAY, group_by=by),  # type: ignore[no-any-return]
                                  metadata=md, timeout=10)


def _arrears(stub: report_pb2_grpc.ReportServiceStub, md: list[tuple[str, str]] | None) -> Any:
    return stub.ArrearsSummary(pb.ArrearsSummaryRequest(as_of_date=DAY), metadata=md, timeout=10)


def _detail(stub: report_pb2_grpc.ReportServiceStub, md: list[tuple[str, str]] | None) -> list[Any]:
    return list(stub.ArrearsDetail(pb.ArrearsDetailRequest(as_of_date=DAY), metadata=md, timeout=10))


def _payments(stub: report_pb2_grpc.ReportServiceStub, md: list[tuple[str, str]] | None,
              bank: str = "") -> list[pb.CollectedPayment]:
    return [p for page in stub.CollectionDetail(pb.CollectionDetailRequest(from_date=DAY, to_date=DAY, bank_id=bank),
                                                metadata=md, timeout=10) for p in page.payments]


def _denied_total(rpc: str, reason: str) -> float:
    return REGISTRY.get_sample_value("yindian_access_denied_total", {"rpc": rpc, "reason": reason}) or 0.0


def _refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    info = error_info(exc.value)
    return exc.value.code(), info.reason if info else ""


def test_no_identity_is_refused_everywhere_and_audited(adapter: Any, caplog: pytest.LogCaptureFixture) -> None:
    _a, stub = adapter
    before = _denied_total("CollectionSummary", "NO_IDENTITY")
    with caplog.at_level(logging.WARNING, logger="yindian.audit"):
        for call in (lambda: _summary(stub, None), lambda: _arrears(stub, None), lambda: _detail(stub, None),
                     lambda: _payments(stub, None)):
            assert _refused(call) == (DENIED, "NO_IDENTITY")
    assert _denied_total("CollectionSummary", "NO_IDENTITY") == before + 1
    assert sum("event=access_denied" in r.getMessage() and "reason=NO_IDENTITY" in r.getMessage()
               for r in caplog.records) == 4


def test_a_bank_sees_only_its_own_collections(adapter: Any) -> None:
    _a, stub = adapter
    icbc = [("x-yindian-bank-id", "ICBC")]
    by_bank = _summary(stub, icbc)
    assert [(r.key, r.count, r.amount_fen) for r in by_bank.rows] == [("ICBC", 1, 3_000)]
    assert by_bank.total.amount_fen == 3_000
    by_outlet = _summary(stub, icbc, pb.GROUP_BY_OUTLET)
    assert [r.key for r in by_outlet.rows] == ["ICBC/ICBC-OUT1"]
    by_branch = _summary(stub, icbc, pb.GROUP_BY_BRANCH)
    assert [(r.key, r.amount_fen) for r in by_branch.rows] == [("01", 3_000)]
    assert [p.bank_serial for p in _payments(stub, icbc)] == ["I1"]
    # asking for another bank's payments is refused, not answered with its own
    assert _refused(lambda: _payments(stub, icbc, "ABC")) == (DENIED, "OTHER_BANK")


def test_arrears_are_for_operators_only(adapter: Any) -> None:
    _a, stub = adapter
    icbc = [("x-yindian-bank-id", "ICBC")]
    assert _refused(lambda: _arrears(stub, icbc)) == (DENIED, "OPERATOR_ONLY")
    assert _refused(lambda: _detail(stub, icbc)) == (DENIED, "OPERATOR_ONLY")
    op = [("x-yindian-operator", OPERATOR)]
    assert _arrears(stub, op).total.households == 2
    assert sorted(a.branch_code for page in _detail(stub, op) for a in page.accounts) == ["01", "02"]
    everyone = _summary(stub, op)
    assert [(r.key, r.amount_fen) for r in everyone.rows] == [("ABC", 7_000), ("ICBC", 3_000)]
    assert sorted(p.bank_serial for p in _payments(stub, op)) == ["A1", "I1"]


@pytest.mark.parametrize("md", [
    [("x-yindian-bank-id", "ZZB")],                                   # a bank the utility does not know
    [("x-yindian-bank-id", "icbc")],                                  # bank ids are exact
    [("x-yindian-operator", "mallory")],                              # not a configured operator
    [("x-yindian-operator", "mallory"), ("x-yindian-bank-id", "ICBC")],  # no fallback to the bank id
], ids=["unknown-bank", "lowercase-bank", "unconfigured-operator", "operator-claim-with-bank"])
def test_strangers_are_refused(adapter: Any, md: list[tuple[str, str]]) -> None:
    _a, stub = adapter
    code, _reason = _refused(lambda: _summary(stub, md))
    assert code == DENIED
    assert _refused(lambda: _arrears(stub, md))[0] == DENIED


def _write(tmp: Path, name: str, blob: trustme.Blob) -> str:
    path = tmp / name
    blob.write_to_path(str(path))
    return str(path)


def _tls_stub(ca: trustme.CA, target: str, leaf: trustme.LeafCert) -> tuple[grpc.Channel, Any]:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes(),
                                         private_key=leaf.private_key_pem.bytes(),
                                         certificate_chain=leaf.cert_chain_pems[0].bytes())
    ch = grpc.secure_channel(target, creds)
    return ch, report_pb2_grpc.ReportServiceStub(ch)


def test_under_mtls_only_the_certificate_counts(sqlite_url: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    settings = AdapterSettings(db=sqlite_url, listen="127.0.0.1:0", bank_status_ttl_s=0.0, grace_s=1.0,
                               operators=[OPERATOR],
                               tls_cert=_write(tmp_path, "srv.pem", server_cert.cert_chain_pems[0]),
                               tls_key=_write(tmp_path, "srv.key", server_cert.private_key_pem),
                               tls_ca=_write(tmp_path, "ca.pem", ca.cert_pem))
    server, ctx = build_server(settings, ManualClock(NOON))
    for b in BANKS:
        add_bank(ctx.router.primary, b)
    server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        cases = {
            "ICBC": (ca.issue_cert("icbc.bank.example", common_name="ICBC"), "bank"),
            "operator": (ca.issue_cert("ops.utility.example", common_name=OPERATOR), "operator"),
            "ZZB": (ca.issue_cert("zzb.example", common_name="ZZB"), "denied"),
            "lowercase icbc": (ca.issue_cert("x.example", common_name="icbc"), "denied"),
            "utility's server cert": (server_cert, "denied"),
        }
        for name, (leaf, expect) in cases.items():
            ch, stub = _tls_stub(ca, target, leaf)
            with ch:
                # metadata cannot lift a certificate to an operator
                md = [("x-yindian-operator", OPERATOR), ("x-yindian-bank-id", "ICBC")]
                if expect == "operator":
                    assert _arrears(stub, None).as_of_date == DAY, name
                    _summary(stub, None)
                elif expect == "bank":
                    assert _refused(lambda s=stub, m=md: _arrears(s, m))[0] == DENIED, name
                    assert [r.key for r in _summary(stub, md).rows] in ([], ["ICBC"]), name
                else:
                    assert _refused(lambda s=stub, m=md: _summary(s, m))[0] == DENIED, name
                    assert _refused(lambda s=stub, m=md: _arrears(s, m))[0] == DENIED, name
    finally:
        server.stop()
