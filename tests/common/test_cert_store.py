"""The reloadable certificate store (yindian_common.tls): revoked serials from
configuration, a deny-list file and a CA-signed CRL; files re-read when they
change or on reload(); a bad file keeps the previous material."""
from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from tests.e2e.test_cert_matrix import serial_of, write_crl
from yindian_common.tls import CertificateStore, TlsFiles, certificate_identity, parse_serial


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _files(tmp: Path, ca: trustme.CA) -> TlsFiles:
    srv = ca.issue_cert("127.0.0.1", common_name="ICBC")
    srv.cert_chain_pems[0].write_to_path(str(tmp / "srv.pem"))
    srv.private_key_pem.write_to_path(str(tmp / "srv.key"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    return TlsFiles(str(tmp / "srv.pem"), str(tmp / "srv.key"), str(tmp / "ca.pem"))


def test_serials_parse_as_hex_or_decimal() -> None:
    assert parse_serial("0x1F2e") == parse_serial("1f:2e") == parse_serial("1F2E") == parse_serial("dec:7982")
    for bad in ("", "xyz", "dec:12a", "f" * 65):
        with pytest.raises(ValueError):
            parse_serial(bad)


def test_deny_list_and_crl_reload_when_they_change(tmp_path: Path) -> None:
    ca = trustme.CA()
    files = _files(tmp_path, ca)
    a, b, c = (serial_of(ca.issue_cert(f"c{i}.example")) for i in range(3))
    deny = tmp_path / "deny.txt"
    deny.write_text(f"# comment\n{a:x}\n")
    crl = tmp_path / "crl.pem"
    write_crl(ca, crl, [b])
    ticks = Ticks()
    store = CertificateStore(files, revoked_serials=["0x10"], deny_list_file=str(deny), crl_file=str(crl),
                             check_interval_s=1.0, monotonic=ticks)
    assert store.revoked == {0x10, a, b}
    deny.write_text(f"{a:x}\n{c:x}  # another one\n")
    assert store._fetch() is None and store.revoked == {0x10, a, b}  # not yet due for a check
    ticks.now = 1.5
    assert store._fetch() is not None  # new material handed to gRPC once ...
    assert store._fetch() is None  # ... then kept
    assert store.revoked == {0x10, a, b, c}
    # A half-written or foreign file keeps the previous list.
    deny.write_text("not-a-serial\n")
    assert not store.reload() and store.revoked == {0x10, a, b, c}
    write_crl(trustme.CA(), crl, [])  # signed by a CA outside the bundle
    deny.write_text("")
    assert not store.reload() and store.revoked == {0x10, a, b, c}
    write_crl(ca, crl, [])
    assert store.reload() and store.revoked == {0x10}


def test_a_key_that_does_not_match_is_refused(tmp_path: Path) -> None:
    ca = trustme.CA()
    files = _files(tmp_path, ca)
    store = CertificateStore(files)
    ca.issue_cert("other.example").private_key_pem.write_to_path(files.key)
    assert not store.reload()
    with pytest.raises(ValueError):
        CertificateStore(files)


def test_certificate_identity_reads_cn_then_san(tmp_path: Path) -> None:
    ca = trustme.CA()
    for name, leaf, expected in (("cn.pem", ca.issue_cert("x.example", common_name="ICBC"), "ICBC"),
                                 ("san.pem", ca.issue_cert("abc"), "ABC")):
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / name))
        assert certificate_identity(str(tmp_path / name)) == expected
