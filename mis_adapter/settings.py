"""mis_adapter's one settings object (flags > YINDIAN_* env > TOML > defaults)."""
from __future__ import annotations

from pydantic import Field

from mis_adapter.late_fee import LateFeeRates
from yindian_common.server import ServerLimits, TlsFiles
from yindian_common.settings import YinDianSettings


class AdapterSettings(YinDianSettings):
    db: str = Field("sqlite:///var/mis.db", description="SQLAlchemy URL of the MIS database (all branches)")
    branch_db: list[str] = Field(default_factory=list,
                                 description="CODE=URL: branch CODE's database (repeatable); others use --db")
    front_db: str = Field("", description="front database URL: each bank's serial registry across branch "
                                          "databases (default: --db, when --branch-db splits the MIS)")
    listen: str = Field("127.0.0.1:50051", description="gRPC listen address HOST:PORT")
    metrics_host: str = Field("127.0.0.1", description="Prometheus endpoint host")
    metrics_port: int = Field(9101, description="Prometheus endpoint port (0 picks one)")
    insecure: bool = Field(False, description="plain text (loopback only); bank id from x-yindian-bank-id")
    force_insecure: bool = Field(False, description="allow plain text on a non-loopback address")
    tls_cert: str = Field("", description="server certificate (PEM)")
    tls_key: str = Field("", description="server key (PEM)")
    tls_ca: str = Field("", description="CA that signs the banks' client certificates (PEM)")
    clock_start: str = Field("", description="run the clock from this ISO instant (tests, demos)")
    timezone: str = Field("Asia/Shanghai", description="the utility's time zone: business dates")
    migrate: bool = Field(True, description="upgrade the schema at start")
    db_pool_size: int = Field(16, description="connections per branch database")
    db_pool_timeout_s: float = Field(5.0, description="wait for a pooled connection before UNAVAILABLE")
    sqlite_synchronous: str = Field("FULL", description="SQLite synchronous: FULL (durable) or NORMAL")
    max_workers: int = Field(64, description="gRPC worker threads")
    max_concurrent_rpcs: int = Field(256, description="calls in progress before RESOURCE_EXHAUSTED")
    max_message_bytes: int = Field(4 * 1024 * 1024, description="largest gRPC message accepted or sent")
    grace_s: float = Field(10.0, description="drain period on SIGTERM")
    bank_concurrency_max: int = Field(64, description="money-moving calls in progress per bank")
    bank_status_ttl_s: float = Field(1.0, description="how long a bank's suspended flag is cached")
    query_bills_max: int = Field(120, description="unpaid bills listed by QueryAccount (totals cover all)")
    cancel_race_retries: int = Field(3, description="retries of a cancel that raced its payment")
    residential_ppm_per_day: int = Field(1_000, description="late fee, residential, per day (ppm)")
    other_current_year_ppm_per_day: int = Field(2_000, description="late fee, others, current-year arrears")
    other_earlier_years_ppm_per_day: int = Field(3_000, description="late fee, others, earlier years' arrears")
    late_fee_minimum_fen: int = Field(100, description="minimum late fee once any accrues")
    feed_window_max: int = Field(1_000, description="bill feed: notices outstanding past the contiguous ack")
    feed_notice_batch_max: int = Field(500, description="bill feed: notices per stream message")
    feed_results_batch_max: int = Field(5_000, description="bill feed: debit results accepted per message")
    feed_heartbeat_s: float = Field(5.0, description="bill feed: heartbeat (and lease renewal) interval")
    feed_poll_interval_s: float = Field(0.2, description="bill feed: outbox poll interval without LISTEN/NOTIFY")
    feed_lease_ttl_s: float = Field(15.0, description="bill feed: a dead replica's stream lease lapses after this")
    feed_peer_silence_s: float = Field(120.0, description="bill feed: end a stream with no results for this long")
    log_level: str = Field("INFO", description="log level")
    registry_recover_batch_max: int = Field(10_000, description="front registry: open claims settled per "
                                                                "recovery pass (at start)")
    crash_point: str = Field("", description="tests only: SIGKILL this process at a named point "
                                             "(after_claim, after_branch_commit)")

    def late_fee_rates(self) -> LateFeeRates:
        return LateFeeRates(self.residential_ppm_per_day, self.other_current_year_ppm_per_day,
                            self.other_earlier_years_ppm_per_day, self.late_fee_minimum_fen)

    def server_limits(self) -> ServerLimits:
        return ServerLimits(self.max_workers, self.max_concurrent_rpcs, self.max_message_bytes, self.grace_s)

    def tls(self) -> TlsFiles | None:
        if self.tls_cert or self.tls_key or self.tls_ca:
            return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca)
        return None
