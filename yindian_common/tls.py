"""A server's TLS material that can change without a restart: its certificate
and key, the CA bundle its clients' certificates must chain to, and the
revocation of client certificates.

- Rotation: the server's credentials are `grpc.dynamic_ssl_server_credentials`;
  gRPC asks `CertificateStore._fetch` at every new handshake, which re-reads
  the files when their size or mtime changed (checked at most every
  `check_interval_s`) or after `reload()` (SIGHUP). New handshakes use the new
  material; established connections keep theirs.
- Revocation: grpcio has no CRL support, so revoked certificates pass the
  handshake and are refused at every call by `CertificateStore.interceptor()`
  (UNAUTHENTICATED, reason CERTIFICATE_REVOKED, audited). The revoked serials
  are those configured, those of a deny-list file (one serial a line, hex, `#`
  comments) and those of a CRL file (PEM or DER, whose signature must verify
  against the CA bundle); both files reload like the certificates. A connection opened
  before a revocation is refused from its next call on.

A file that cannot be read or parsed is logged and the previous material is
kept: a half-written file never takes the server's TLS down. This module
never decides who may do what beyond "is this certificate revoked"."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from yindian_common.errors import Unauthenticated
from yindian_common.identity import ACCESS_DENIED, AdmissionInterceptor, audit_log, certificate_names, shown

log = logging.getLogger("yindian.tls")

# Peer certificates whose serial was parsed, remembered by their PEM bytes.
PEER_SERIAL_CACHE_MAX = 4_096
# A deny-list entry: hex (optionally 0x-prefixed or colon-separated) or decimal digits.
SERIAL_TEXT_MAX = 64
DENY_LIST_SERIALS_MAX = 100_000
PEER_CERT_KEY = "x509_pem_cert"


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str


class RevocationSettings(Protocol):
    """What a server's settings say about its TLS material (yindian_common.settings.ServerSettings)."""
    tls_revoked_serials: list[str]
    tls_deny_list: str
    tls_crl: str
    tls_reload_check_s: float

    def tls(self) -> TlsFiles | None: ...


def certificate_store(settings: RevocationSettings) -> CertificateStore | None:
    """The server's reloadable TLS material, or None in plain-text mode. A bad file at start is fatal."""
    files = settings.tls()
    if files is None:
        return None
    try:
        return CertificateStore(files, revoked_serials=settings.tls_revoked_serials,
                                deny_list_file=settings.tls_deny_list, crl_file=settings.tls_crl,
                                check_interval_s=settings.tls_reload_check_s)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"TLS files: {exc}") from exc


def certificate_identity(path: str) -> str:
    """The identity a certificate file presents, read as servers read a peer's:
    its subject CN, else its first DNS SAN upper-cased."""
    cert = x509.load_pem_x509_certificates(_read(path))[0]
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if cns and str(cns[0].value):
        return str(cns[0].value)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    names = sans.get_values_for_type(x509.DNSName)
    return names[0].upper() if names else ""


def parse_serial(text: str) -> int:
    """A certificate serial as configured: `0x1f2e`, `1F:2E` or `1f2e` (hex), or `dec:7982` (decimal)."""
    raw = text.strip()
    if not raw or len(raw) > SERIAL_TEXT_MAX:
        raise ValueError(f"certificate serial {text!r}: empty or longer than {SERIAL_TEXT_MAX} characters")
    try:
        if raw.lower().startswith("dec:"):
            return int(raw[4:], 10)
        return int(raw.lower().removeprefix("0x").replace(":", ""), 16)
    except ValueError:
        raise ValueError(f"certificate serial {text!r}: not hex (or dec:<digits>)") from None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _stamp(paths: Iterable[str]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((p, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((p, -1, -1))
    return tuple(out)


@dataclass(frozen=True)
class _Material:
    key: bytes
    chain: bytes
    ca: bytes
    revoked: frozenset[int]


def _load_crl_serials(path: str, ca_pem: bytes) -> frozenset[int]:
    blob = _read(path)
    crl = x509.load_pem_x509_crl(blob) if b"-----BEGIN" in blob else x509.load_der_x509_crl(blob)
    issuers = [c for c in x509.load_pem_x509_certificates(ca_pem) if c.subject == crl.issuer]
    key: CertificateIssuerPublicKeyTypes
    for issuer in issuers:
        key = issuer.public_key()  # type: ignore[assignment]
        if crl.is_signature_valid(key):
            return frozenset(r.serial_number for r in crl)
    raise ValueError(f"{path}: the CRL is not signed by a CA of the bundle")


def _load_deny_list(path: str) -> frozenset[int]:
    serials = set()
    for n, line in enumerate(_read(path).decode("utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            serials.add(parse_serial(text))
        except ValueError as exc:
            raise ValueError(f"{path} line {n}: {exc}") from None
        if len(serials) > DENY_LIST_SERIALS_MAX:
            raise ValueError(f"{path}: more than {DENY_LIST_SERIALS_MAX} serials")
    return frozenset(serials)


def _check_pair(key_pem: bytes, chain_pem: bytes) -> None:
    """The key must belong to the first certificate of the chain (else every handshake fails)."""
    cert = x509.load_pem_x509_certificates(chain_pem)[0]
    key = serialization.load_pem_private_key(key_pem, password=None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise ValueError("the private key does not match the certificate")


class CertificateStore:
    """The server's TLS material and the revoked client serials, reloadable."""

    def __init__(self, files: TlsFiles, *, revoked_serials: Iterable[str] = (), deny_list_file: str = "",
                 crl_file: str = "", check_interval_s: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.files = files
        self.deny_list_file = deny_list_file
        self.crl_file = crl_file
        self._deny = frozenset(parse_serial(s) for s in revoked_serials)
        self._check_interval_s = check_interval_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths())
        self._material = self._load()  # a bad file at start is fatal: raises
        self._fresh: _Material | None = None  # loaded, not yet handed to gRPC
        self._next_check = monotonic() + check_interval_s
        self._peer_serials: dict[bytes, int] = {}
        self.reloads = 0

    def _paths(self) -> list[str]:
        return [self.files.cert, self.files.key, self.files.ca, *(p for p in (self.deny_list_file, self.crl_file) if p)]

    def _load(self) -> _Material:
        key, chain, ca = _read(self.files.key), _read(self.files.cert), _read(self.files.ca)
        _check_pair(key, chain)
        if not x509.load_pem_x509_certificates(ca):
            raise ValueError(f"{self.files.ca}: no CA certificate")
        revoked = (self._deny | (_load_deny_list(self.deny_list_file) if self.deny_list_file else frozenset())
                   | (_load_crl_serials(self.crl_file, ca) if self.crl_file else frozenset()))
        return _Material(key, chain, ca, revoked)

    # ---- reloading ----
    def reload(self, *, force: bool = True) -> bool:
        """Re-reads the files (SIGHUP; `force=False`: only if they changed). True if new material is in use."""
        with self._lock:
            stamp = _stamp(self._paths())
            if not force and stamp == self._stamp:
                return False
            try:
                material = self._load()
            except (OSError, ValueError) as exc:
                log.error("event=tls_reload_failed error=%r action=keep_previous", str(exc)[:200])
                return False
            self._stamp = stamp
            self._material = material
            self._fresh = material
            self._peer_serials.clear()
            self.reloads += 1
        log.warning("event=tls_reloaded revoked_serials=%d", len(material.revoked))
        return True

    def _maybe_reload(self) -> None:
        now = self._monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self._check_interval_s
        self.reload(force=False)

    def _config(self, m: _Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.key, m.chain)], root_certificates=m.ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake hook: new material once, else None (keep the current)."""
        self._maybe_reload()
        with self._lock:
            fresh, self._fresh = self._fresh, None
        return None if fresh is None else self._config(fresh)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config(self._material), self._fetch,
                                                   require_client_authentication=True)

    # ---- revocation ----
    @property
    def revoked(self) -> frozenset[int]:
        return self._material.revoked

    def peer_serial(self, context: grpc.ServicerContext) -> int | None:
        pems = context.auth_context().get(PEER_CERT_KEY)
        if not pems:
            return None
        pem = pems[0]
        serial = self._peer_serials.get(pem)
        if serial is None:
            serial = x509.load_pem_x509_certificate(pem).serial_number
            if len(self._peer_serials) >= PEER_SERIAL_CACHE_MAX:
                self._peer_serials.clear()
            self._peer_serials[pem] = serial
        return serial

    def interceptor(self) -> AdmissionInterceptor:
        """Refuses every call made with a revoked client certificate, before the handler runs."""
        return AdmissionInterceptor(self.check_peer)

    def check_peer(self, context: grpc.ServicerContext, rpc: str) -> None:
        """Raises Unauthenticated (and audits) when the peer's certificate is revoked."""
        self._maybe_reload()
        revoked = self._material.revoked
        if not revoked:
            return
        serial = self.peer_serial(context)
        if serial is None or serial not in revoked:
            return
        cn, san = certificate_names(context)
        ACCESS_DENIED.labels(rpc, "CERTIFICATE_REVOKED").inc()
        audit_log.warning("event=access_denied rpc=%s reason=CERTIFICATE_REVOKED caller=%s serial=%x", rpc,
                          shown(cn or san), serial)
        raise Unauthenticated(f"client certificate serial {serial:x} is revoked", reason="CERTIFICATE_REVOKED")
