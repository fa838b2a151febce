"""The portal's one settings object (flags > YINDIAN_* env > TOML > defaults).
Every bound the portal uses is named here."""
from __future__ import annotations

from pydantic import Field

from yindian_common.server import TlsFiles
from yindian_common.settings import YinDianSettings


class PortalSettings(YinDianSettings):
    # --- addresses and identity ---
    listen: str = Field("127.0.0.1:8080", description="HTTP(S) address customers' browsers reach (HOST:PORT; "
                                                      "port 0 picks one)")
    upstream: str = Field("127.0.0.1:50051", description="mis_adapter's gRPC address (HOST:PORT)")
    operator: str = Field("portal", description="the utility operator identity presented to mis_adapter: "
                                                "x-yindian-operator in plain text; with mTLS the certificate's CN")
    metrics_host: str = Field("127.0.0.1", description="address of the Prometheus /metrics endpoint")
    metrics_port: int = Field(9103, description="port of the Prometheus /metrics endpoint (0 picks one)")
    insecure: bool = Field(False, description="plain-text gRPC to mis_adapter on loopback (development only)")
    force_insecure: bool = Field(False, description="allow plain-text gRPC to a non-loopback mis_adapter")
    tls_cert: str = Field("", description="PEM client certificate presented to mis_adapter (its CN is the operator)")
    tls_key: str = Field("", description="PEM private key of --tls-cert")
    tls_ca: str = Field("", description="PEM CA bundle that signs mis_adapter's server certificate")
    https_cert: str = Field("", description="PEM certificate served to browsers (HTTPS; enables HSTS)")
    https_key: str = Field("", description="PEM private key of --https-cert")
    forwarded_allow_ips: str = Field("", description="reverse proxies whose X-Forwarded-For/-Proto are trusted "
                                                     "(comma-separated IPs); empty: none")
    log_level: str = Field("INFO", description="log level")

    # --- upstream calls ---
    upstream_deadline_s: float = Field(2.0, description="deadline of each call to mis_adapter")
    upstream_max_message_bytes: int = Field(1024 * 1024, description="largest gRPC message from mis_adapter")
    overview_months: int = Field(12, description="bills shown (and drawn in the chart); at most 24")

    # --- anti-enumeration and abuse ---
    lookup_min_response_s: float = Field(0.8, description="every look-up answer (found, not found, limited, "
                                                          "unavailable) takes at least this long, so timing "
                                                          "cannot tell a wrong account from a wrong phone")
    limit_per_client: str = Field("20/minute;100/hour", description="look-up attempts per client address "
                                                                  "(limits notation)")
    limit_per_account: str = Field("10/hour", description="look-up attempts per account number, whoever tries")
    limit_keys_max: int = Field(20_000, description="client addresses and accounts tracked at once; when full, "
                                                    "new ones are refused as over the limit (fail closed)")
    request_body_max_bytes: int = Field(4_096, description="largest request body accepted (the form is tiny)")
    max_concurrent_requests: int = Field(100, description="requests in progress before HTTP 503")
    csrf_secret: str = Field("", description="secret signing CSRF tokens (share it between replicas); "
                                             "empty: a random one per process")
    grace_s: float = Field(10.0, description="drain period on SIGTERM")

    def upstream_tls(self) -> TlsFiles | None:
        if self.tls_cert or self.tls_key or self.tls_ca:
            return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca)
        return None

    @property
    def https(self) -> bool:
        return bool(self.https_cert and self.https_key)
