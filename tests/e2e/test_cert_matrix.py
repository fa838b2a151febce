"""Issue 9 items 8 and 9 on real processes under mutual TLS (trustme
certificates): the certificate matrix on both servers, the bridge's
allow-list with the caller recorded on its journal, and revocation and
rotation without a restart (SIGHUP, or the files changing).

    case            mis_adapter          bridge
    valid (ICBC)    OK                   OK
    none            UNAVAILABLE          UNAVAILABLE        (refused at the handshake)
    other CA        UNAVAILABLE          UNAVAILABLE        (refused at the handshake)
    expired         UNAVAILABLE          UNAVAILABLE        (refused at the handshake)
    revoked         UNAUTHENTICATED      UNAUTHENTICATED    (CRL / deny-list, every call)
    unknown bank    PERMISSION_DENIED    PERMISSION_DENIED
    another bank    OK (its own data)    PERMISSION_DENIED  (the bridge admits its own bank only)
"""
from __future__ import annotations

import datetime as dt
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mis_adapter.routing import BranchRouter
from mis_adapter.seed import seed
from tests.support import procs
from tests.support.databases import migrated_sqlite
from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.db import make_engine
from yindian_common.status import error_info

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
CLOCK = "2026-11-28T10:00:00+08:00"
RELOAD_WAIT_S = 15.0
OK = grpc.StatusCode.OK


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def write_crl(ca: trustme.CA, path: Path, serials: list[int]) -> None:
    """A CRL signed by the CA (trustme exposes its key and certificate)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - dt.timedelta(minutes=1)).next_update(now + dt.timedelta(days=1)))
    for s in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
    crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    tmp.replace(path)  # atomic: the server never reads half a file


@dataclass
class Pki:
    dir: Path
    ca: trustme.CA
    clients: dict[str, trustme.LeafCert | None]
    other_ca: trustme.CA

    def path(self, name: str) -> str:
        return str(self.dir / name)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    now = dt.datetime.now(dt.UTC)
    mis = ca.issue_cert("127.0.0.1", "localhost", common_name="mis-adapter.utility")
    bridge = ca.issue_cert("127.0.0.1", "localhost", common_name="ICBC")  # serves the core, is ICBC on the link
    for name, blob in (("ca.pem", ca.cert_pem), ("mis.pem", mis.cert_chain_pems[0]), ("mis.key", mis.private_key_pem),
                       ("bridge.pem", bridge.cert_chain_pems[0]), ("bridge.key", bridge.private_key_pem)):
        blob.write_to_path(str(tmp_path / name))
    clients: dict[str, trustme.LeafCert | None] = {
        "valid": ca.issue_cert("core.icbc.example", common_name="ICBC"),
        "none": None,
        "other CA": other.issue_cert("core.icbc.example", common_name="ICBC"),
        "expired": ca.issue_cert("core.icbc.example", common_name="ICBC", not_before=now - dt.timedelta(days=30),
                                 not_after=now - dt.timedelta(days=1)),
        "revoked": ca.issue_cert("core.icbc.example", common_name="ICBC"),
        "unknown bank": ca.issue_cert("zzb.example", common_name="ZZB"),
        "another bank": ca.issue_cert("abc.example", common_name="ABC"),
        "allowed client": ca.issue_cert("tellers.icbc.example", common_name="ICBC-TELLERS"),
    }
    write_crl(ca, tmp_path / "crl.pem", [serial_of(clients["revoked"])])  # type: ignore[arg-type]
    (tmp_path / "deny.txt").write_text(f"# revoked bank-core certificates\n{serial_of(clients['revoked']):x}\n")  # type: ignore[arg-type]
    return Pki(tmp_path, ca, clients, other)


@pytest.fixture
def servers(pki: Pki) -> Iterator[tuple[procs.Proc, procs.Proc, list[str], str]]:
    url = migrated_sqlite(pki.dir / "mis.db")
    router = BranchRouter(url, {})
    seed(router, 20, pki.dir / "rosters", today=dt.date(2026, 11, 28), now=dt.datetime.fromisoformat(CLOCK))
    router.dispose()
    roster = (pki.dir / "rosters" / "ICBC.csv").read_text().split()[1:]
    mis = procs.start("mis_adapter", [
        "mis_adapter", "serve", "--db", url, "--listen", "127.0.0.1:0", "--metrics-port", "0", "--clock-start", CLOCK,
        "--tls-cert", pki.path("mis.pem"), "--tls-key", pki.path("mis.key"), "--tls-ca", pki.path("ca.pem"),
        "--tls-crl", pki.path("crl.pem"), "--tls-reload-check-s", "0.2"], log_dir=pki.dir)
    bridge_db = migrated_sqlite(pki.dir / "bridge.db", "bridge")
    bridge = procs.start("bridge", [
        "bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", mis.grpc_addr, "--db", bridge_db,
        "--metrics-port", "0", "--clock-start", CLOCK, "--bank-id", "ICBC", "--allow-client", "ICBC-TELLERS",
        "--tls-cert", pki.path("bridge.pem"), "--tls-key", pki.path("bridge.key"), "--tls-ca", pki.path("ca.pem"),
        "--tls-deny-list", pki.path("deny.txt"), "--tls-reload-check-s", "0.2"], log_dir=pki.dir)
    try:
        yield mis, bridge, roster, bridge_db
    finally:
        for p in (bridge, mis):
            p.terminate()


def pay(pki: Pki, target: str, leaf: trustme.LeafCert | None, serial: str, account: str) -> grpc.StatusCode:
    """A Pay over a fresh connection (a new handshake) presenting `leaf`; the status it got."""
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem.bytes(),
                                         private_key=leaf.private_key_pem.bytes() if leaf else None,
                                         certificate_chain=leaf.cert_chain_pems[0].bytes() if leaf else None)
    with grpc.secure_channel(target, creds) as ch:
        try:
            billing_pb2_grpc.BillingServiceStub(ch).Pay(
                pb.PayRequest(bank_serial=serial, account_no=account, amount_fen=100, outlet_code="O1",
                              teller_id="T1", channel=pb.CHANNEL_COUNTER), timeout=10)
            return OK
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                assert error_info(exc) is not None  # a YinDian refusal with a reason, not a transport error
            return exc.code()  # type: ignore[no-any-return]


def wait_for(what: str, probe: Callable[[], grpc.StatusCode], expected: grpc.StatusCode) -> None:
    """Polls (fresh handshakes) until the server shows the reloaded material, within a bound."""
    deadline = time.monotonic() + RELOAD_WAIT_S
    got = probe()
    while got != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        got = probe()
    assert got == expected, f"{what}: still {got.name} after {RELOAD_WAIT_S}s"


EXPECTED = {  # case: (mis_adapter, bridge)
    "valid": (OK, OK),
    "none": (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
    "other CA": (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
    "expired": (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
    "revoked": (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
    "unknown bank": (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED),
    "another bank": (OK, grpc.StatusCode.PERMISSION_DENIED),
    "allowed client": (grpc.StatusCode.PERMISSION_DENIED, OK),  # ICBC-TELLERS is no bank of the utility's
}


def test_certificate_matrix_revocation_and_rotation(pki: Pki, servers: tuple[procs.Proc, procs.Proc, list[str], str]
                                                    ) -> None:
    mis, bridge, roster, bridge_db = servers
    got: dict[str, tuple[grpc.StatusCode, grpc.StatusCode]] = {}
    for i, (case, leaf) in enumerate(pki.clients.items()):
        account = roster[i % len(roster)]
        got[case] = (pay(pki, mis.grpc_addr, leaf, f"M{i}", account),
                     pay(pki, bridge.grpc_addr, leaf, f"B{i}", account))
    print("\n".join(f"{c:15} mis_adapter={m.name:18} bridge={b.name}" for c, (m, b) in got.items()))
    assert got == EXPECTED

    # The bridge journaled only what it admitted, with its own bank and the caller's identity on every row.
    eng = make_engine(bridge_db, pool_size=1)
    with eng.connect() as conn:
        rows = conn.execute(sa.text("SELECT serial, bank_id, caller FROM bridge_journal ORDER BY serial")).all()
    eng.dispose()
    cases = list(pki.clients)
    assert [tuple(r) for r in rows] == [(f"B{cases.index('valid')}", "ICBC", "ICBC"),
                                        (f"B{cases.index('allowed client')}", "ICBC", "ICBC-TELLERS")]

    valid = pki.clients["valid"]
    # Revocation without a restart: the bridge's deny-list file changes (noticed by itself) ...
    deny = pki.dir / "deny.txt"
    deny.write_text(deny.read_text() + f"{serial_of(valid):x}\n")  # type: ignore[arg-type]
    n = iter(range(100, 10_000))
    wait_for("bridge deny-list", lambda: pay(pki, bridge.grpc_addr, valid, f"B{next(n)}", roster[0]),
             grpc.StatusCode.UNAUTHENTICATED)
    # ... and mis_adapter's CRL is rewritten, then SIGHUP.
    write_crl(pki.ca, pki.dir / "crl.pem", [serial_of(pki.clients["revoked"]), serial_of(valid)])  # type: ignore[arg-type]
    mis.popen.send_signal(signal.SIGHUP)
    wait_for("mis_adapter CRL", lambda: pay(pki, mis.grpc_addr, valid, f"M{next(n)}", roster[0]),
             grpc.StatusCode.UNAUTHENTICATED)

    # Rotation: the CA bundle gains a second CA; its bank certificate is trusted from the next handshake on.
    newcomer = pki.other_ca.issue_cert("core.icbc.example", common_name="ICBC")
    bundle = pki.dir / "ca.pem"
    assert pay(pki, mis.grpc_addr, newcomer, "M-new-0", roster[1]) == grpc.StatusCode.UNAVAILABLE
    tmp = pki.dir / "ca.tmp"
    tmp.write_bytes(pki.ca.cert_pem.bytes() + pki.other_ca.cert_pem.bytes())
    tmp.replace(bundle)
    mis.popen.send_signal(signal.SIGHUP)
    bridge.popen.send_signal(signal.SIGHUP)
    wait_for("mis_adapter CA bundle", lambda: pay(pki, mis.grpc_addr, newcomer, f"M{next(n)}", roster[1]), OK)
    wait_for("bridge CA bundle", lambda: pay(pki, bridge.grpc_addr, newcomer, f"B{next(n)}", roster[1]), OK)
    assert mis.popen.poll() is None and bridge.popen.poll() is None  # no restart
    log = "".join(mis.output + bridge.output)
    assert "event=tls_reloaded" in log and "reason=CERTIFICATE_REVOKED" in log
