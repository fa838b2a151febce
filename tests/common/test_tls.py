"""mTLS on the link: the bank is whoever the client certificate names;
no or an untrusted certificate is refused at the handshake; plain text is
refused on non-loopback addresses unless forced."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
import trustme

from mis_adapter.serve import build_server
from mis_adapter.settings import AdapterSettings
from tests.support.mis_data import BANKS, NOON, BillSpec, add_account, add_bank
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.clock import ManualClock
from yindian_common.server import GrpcServer, ServerLimits, check_plaintext_allowed


def _write(tmp: Path, name: str, blob: trustme.Blob) -> str:
    path = tmp / name
    blob.write_to_path(str(path))
    return str(path)


def test_bank_identity_comes_from_the_client_certificate(sqlite_url: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_path = _write(tmp_path, "ca.pem", ca.cert_pem)
    settings = AdapterSettings(db=sqlite_url, listen="127.0.0.1:0", bank_status_ttl_s=0.0, grace_s=1.0,
                               tls_cert=_write(tmp_path, "srv.pem", server_cert.cert_chain_pems[0]),
                               tls_key=_write(tmp_path, "srv.key", server_cert.private_key_pem), tls_ca=ca_path)
    server, ctx = build_server(settings, ManualClock(NOON))
    for b in BANKS:
        add_bank(ctx.router.primary, b)
    acct = add_account(ctx.router.primary, "01", 1, [BillSpec("202610", 10_000, dt.date(2026, 11, 25))])
    server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        icbc = ca.issue_cert("icbc.bank.example", common_name="ICBC")  # subject CN
        creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes(),
                                             private_key=icbc.private_key_pem.bytes(),
                                             certificate_chain=icbc.cert_chain_pems[0].bytes())
        with grpc.secure_channel(target, creds) as ch:
            stub = billing_pb2_grpc.BillingServiceStub(ch)
            # metadata cannot impersonate another bank over mTLS
            stub.Pay(pb.PayRequest(bank_serial="T1", account_no=acct, amount_fen=500, channel=pb.CHANNEL_COUNTER),
                     metadata=[("x-yindian-bank-id", "ABC")], timeout=10)
            assert stub.GetPayment(pb.GetPaymentRequest(bank_serial="T1"), timeout=10).state == \
                pb.PAYMENT_STATE_POSTED
        abc_view = ca.issue_cert("abc")  # no CN: the SAN names the bank
        creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes(),
                                             private_key=abc_view.private_key_pem.bytes(),
                                             certificate_chain=abc_view.cert_chain_pems[0].bytes())
        with grpc.secure_channel(target, creds) as ch:
            stub = billing_pb2_grpc.BillingServiceStub(ch)
            assert stub.GetPayment(pb.GetPaymentRequest(bank_serial="T1"), timeout=10).state == \
                pb.PAYMENT_STATE_NOT_FOUND
        # a certificate from another CA, and no certificate at all, never get a call through
        rogue = trustme.CA().issue_cert("ICBC")
        for key, chain in ((rogue.private_key_pem.bytes(), rogue.cert_chain_pems[0].bytes()), (None, None)):
            creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes(), private_key=key,
                                                 certificate_chain=chain)
            with grpc.secure_channel(target, creds) as ch:
                stub = billing_pb2_grpc.BillingServiceStub(ch)
                with pytest.raises(grpc.RpcError) as exc:
                    stub.GetPayment(pb.GetPaymentRequest(bank_serial="T1"), timeout=5)
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_plain_text_refused_off_loopback() -> None:
    with pytest.raises(SystemExit):
        check_plaintext_allowed("10.1.2.3:50051", force=False)
    with pytest.raises(SystemExit):
        check_plaintext_allowed("0.0.0.0:50051", force=False)
    check_plaintext_allowed("10.1.2.3:50051", force=True)
    check_plaintext_allowed("127.0.0.1:50051", force=False)
    check_plaintext_allowed("[::1]:50051", force=False)
    check_plaintext_allowed("localhost:50051", force=False)
    with pytest.raises(SystemExit):
        GrpcServer(listen="0.0.0.0:0", limits=ServerLimits(), tls=None, insecure=True)
