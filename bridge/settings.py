"""The bridge's one settings object: flags, YINDIAN_* environment, TOML file,
defaults (highest first). Every bound the bridge uses is named here."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from yindian_common.clock import DEFAULT_TZ
from yindian_common.server import ServerLimits, TlsFiles
from yindian_common.settings import YinDianSettings


class BridgeSettings(YinDianSettings):
    # --- addresses and identity ---
    listen: str = Field("127.0.0.1:50052", description="address the bank core connects to (HOST:PORT)")
    upstream: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:50051"],
        description="mis_adapter's address over the link (HOST:PORT); repeat it (or separate with commas) for "
                    "replicas: calls go to a healthy one")
    db: str = Field("sqlite:///var/bridge.db", description="SQLAlchemy URL of the bridge's own journal database")
    bank_id: str = Field("", description="this bank's id; sent as x-yindian-bank-id in plain-text mode "
                                         "(with mTLS the link certificate identifies the bank)")
    metrics_host: str = Field("127.0.0.1", description="address of the Prometheus /metrics endpoint")
    metrics_port: int = Field(9102, description="port of the Prometheus /metrics endpoint (0 picks one)")
    insecure: bool = Field(False, description="plain text on loopback, no TLS (development only)")
    force_insecure: bool = Field(False, description="allow plain text on a non-loopback address")
    tls_cert: str = Field("", description="PEM certificate: served to the bank core and presented to the utility")
    tls_key: str = Field("", description="PEM private key of --tls-cert")
    tls_ca: str = Field("", description="PEM CA bundle that signs the bank core's and the utility's certificates")
    clock_start: str = Field("", description="ISO instant the process clock starts at (tests, demos); "
                                             "empty: system time")
    timezone: str = Field(DEFAULT_TZ, description="time zone of business dates")
    log_level: str = Field("INFO", description="log level")

    # --- upstream calls ---
    upstream_deadline_cap_s: float = Field(5.0, description="longest deadline of any call to mis_adapter; "
                                                            "also used when the caller set none")
    upstream_deadline_margin_s: float = Field(0.05, description="kept back from the caller's remaining time "
                                                                "so the bridge can answer before it expires")
    upstream_deadline_min_s: float = Field(0.02, description="a request with less time left than this is refused "
                                                             "with DEADLINE_EXCEEDED before journaling")
    upstream_health_interval_s: float = Field(1.0, description="health check of each upstream replica "
                                                               "(with more than one)")
    upstream_health_timeout_s: float = Field(1.0, description="deadline of one replica health check")
    upstream_max_message_bytes: int = Field(4 * 1024 * 1024, description="message size limit on the link")

    # --- idempotency ---
    duplicate_wait_s: float = Field(2.0, description="how long a duplicate of an in-flight serial waits for "
                                                     "its original before getting ABORTED")

    # --- journal ---
    db_pool_size: int = Field(16, description="connections to the journal database")
    sqlite_synchronous: str = Field("FULL", description="SQLite journal durability: FULL or NORMAL")
    journal_batch_max: int = Field(256, description="most outcomes recorded in one journal transaction")
    journal_queue_max: int = Field(4096, description="outcomes waiting to be recorded before callers block")
    journal_idle_wait_s: float = Field(0.5, description="how long the journal writer waits for work per loop")
    journal_linger_s: float = Field(0.005, description="how long recorded outcomes (already answered) may wait "
                                                       "to share a journal transaction with others")

    # --- in-doubt resolution ---
    resolver_enabled: bool = Field(True, description="run the background resolver of in-doubt requests")
    resolver_batch_max: int = Field(64, description="in-doubt rows taken per resolver pass")
    resolver_idle_wait_s: float = Field(1.0, description="resolver wait between passes when nothing is due")
    resolver_call_timeout_s: float = Field(3.0, description="deadline of each resolver call to mis_adapter")
    resolver_backoff_initial_s: float = Field(0.2, description="first retry delay of an unresolved row")
    resolver_backoff_cap_s: float = Field(10.0, description="longest retry delay of an unresolved row")

    # --- server limits ---
    max_workers: int = Field(64, description="threads serving RPCs")
    max_concurrent_rpcs: int = Field(256, description="concurrent RPCs before RESOURCE_EXHAUSTED")
    max_message_bytes: int = Field(4 * 1024 * 1024, description="largest message accepted from the bank core")
    grace_s: float = Field(10.0, description="drain period on SIGTERM")

    @field_validator("upstream", mode="before")
    @classmethod
    def _upstream_list(cls, value: object) -> object:
        """One address, a comma-separated list, or a list (repeated flags, TOML array)."""
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list):
            return [a.strip() for part in items for a in str(part).split(",") if a.strip()]
        return value

    def limits(self) -> ServerLimits:
        return ServerLimits(max_workers=self.max_workers, max_concurrent_rpcs=self.max_concurrent_rpcs,
                            max_message_bytes=self.max_message_bytes, grace_s=self.grace_s)

    def tls(self) -> TlsFiles | None:
        if not (self.tls_cert or self.tls_key or self.tls_ca):
            return None
        if not (self.tls_cert and self.tls_key and self.tls_ca):
            raise SystemExit("--tls-cert, --tls-key and --tls-ca go together")
        return TlsFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)
