"""Under mTLS the operator is whoever the client certificate names: the portal
process presents its certificate (CN=portal) to a TLS mis_adapter and serves
browsers over HTTPS with HSTS; a bank's certificate gets PERMISSION_DENIED
from CustomerService, and metadata cannot claim another operator's role."""
from __future__ import annotations

import datetime as dt
import http.cookiejar
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
import trustme

from mis_adapter.db.core import Customer
from mis_adapter.serve import build_server
from mis_adapter.settings import AdapterSettings
from tests.support import procs
from tests.support.mis_data import BANKS, NOON, BillSpec, add_account, add_bank
from yindian.v1 import customer_pb2 as pb
from yindian.v1 import customer_pb2_grpc
from yindian_common.clock import ManualClock

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _write(tmp: Path, name: str, blob: trustme.Blob) -> str:
    path = tmp / name
    blob.write_to_path(str(path))
    return str(path)


def _creds(ca: trustme.CA, cert: trustme.LeafCert) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes(), private_key=cert.private_key_pem.bytes(),
                                        certificate_chain=cert.cert_chain_pems[0].bytes())


def https_lookup(base: str, ctx: ssl.SSLContext, jar: http.cookiejar.CookieJar, account_no: str, last4: str
                 ) -> tuple[int, str, dict[str, str]]:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar),
                                         urllib.request.HTTPSHandler(context=ctx))
    form = opener.open(f"{base}/", timeout=10).read().decode()
    token = re.search(r'name="csrftoken" value="([^"]+)"', form)
    assert token
    data = urllib.parse.urlencode({"csrftoken": token.group(1), "account_no": account_no,
                                   "phone_last4": last4}).encode()
    try:
        with opener.open(f"{base}/lookup", data=data, timeout=10) as resp:
            return resp.status, resp.read().decode(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), {k.lower(): v for k, v in exc.headers.items()}


def test_operator_identity_from_certificates_and_https_portal(sqlite_url: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_path = _write(tmp_path, "ca.pem", ca.cert_pem)
    srv = ca.issue_cert("127.0.0.1", "localhost")
    settings = AdapterSettings(db=sqlite_url, listen="127.0.0.1:0", bank_status_ttl_s=0.0, grace_s=1.0,
                               tls_cert=_write(tmp_path, "srv.pem", srv.cert_chain_pems[0]),
                               tls_key=_write(tmp_path, "srv.key", srv.private_key_pem), tls_ca=ca_path,
                               operators=["portal", "dunning"], dunning_operators=["dunning"])
    server, ctx = build_server(settings, ManualClock(NOON))
    for b in BANKS:
        add_bank(ctx.router.primary, b)
    acct = add_account(ctx.router.primary, "01", 1, [BillSpec("202610", 10_000, dt.date(2026, 11, 25))])
    with ctx.router.primary.begin() as conn:
        t = Customer.__table__
        conn.execute(sa.update(t).where(t.c.account_no == acct).values(phone="13900004321"))
    server.start()
    target = f"127.0.0.1:{server.port}"
    portal = None
    try:
        with grpc.secure_channel(target, _creds(ca, ca.issue_cert("icbc.bank.example", common_name="ICBC"))) as ch:
            with pytest.raises(grpc.RpcError) as exc:
                customer_pb2_grpc.CustomerServiceStub(ch).GetAccountOverview(
                    pb.GetAccountOverviewRequest(account_no=acct, phone_last4="4321"),
                    metadata=[("x-yindian-operator", "portal")], timeout=10)
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        portal_cert = ca.issue_cert("portal.utility.example", common_name="portal")
        with grpc.secure_channel(target, _creds(ca, portal_cert)) as ch:
            stub = customer_pb2_grpc.CustomerServiceStub(ch)
            assert stub.GetAccountOverview(pb.GetAccountOverviewRequest(account_no=acct, phone_last4="4321"),
                                           timeout=10).arrears_fen == 10_000
            with pytest.raises(grpc.RpcError) as exc:   # metadata does not make the portal a dunning operator
                stub.ListDunningCandidates(pb.ListDunningCandidatesRequest(),
                                           metadata=[("x-yindian-operator", "dunning")], timeout=10)
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED

        web = ca.issue_cert("127.0.0.1")
        portal = procs.start("portal", [
            "portal", "serve", "--listen", "127.0.0.1:0", "--upstream", target, "--metrics-port", "0",
            "--tls-cert", _write(tmp_path, "portal.pem", portal_cert.cert_chain_pems[0]),
            "--tls-key", _write(tmp_path, "portal.key", portal_cert.private_key_pem), "--tls-ca", ca_path,
            "--https-cert", _write(tmp_path, "web.pem", web.cert_chain_pems[0]),
            "--https-key", _write(tmp_path, "web.key", web.private_key_pem),
            "--lookup-min-response-s", "0.1"], log_dir=tmp_path)
        browser_ctx = ssl.create_default_context(cafile=ca_path)
        jar = http.cookiejar.CookieJar()
        status, body, headers = https_lookup(f"https://{portal.grpc_addr}", browser_ctx, jar, acct, "4321")
        assert status == 200 and "100.00 元" in body
        assert headers["strict-transport-security"].startswith("max-age=")
        assert [(c.name, c.secure) for c in jar] == [("csrftoken", True)]
    finally:
        if portal is not None:
            assert portal.terminate() == 0
        server.stop()
