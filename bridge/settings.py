"""The bridge's one settings object: flags, YINDIAN_* environment, TOML file,
defaults (highest first). Every bound the bridge uses is named here; what both
servers share (TLS, clock, time zone, server limits, pool) comes from
yindian_common.settings.ServerSettings."""
from __future__ import annotations

from typing import Annotated, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from yindian_common.settings import MESSAGE_BYTES_MAX, PORT_MAX, NameList, SealingServerSettings


class BridgeSettings(SealingServerSettings):
    # --- addresses and identity ---
    listen: str = Field("127.0.0.1:50052", description="address the bank core connects to (HOST:PORT)")
    upstream: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:50051"],
        description="mis_adapter's address over the link (HOST:PORT); repeat it (or separate with commas) for "
                    "replicas: calls go to a healthy one")
    db: str = Field("sqlite:///var/bridge.db", description="SQLAlchemy URL of the bridge's own journal database")
    bank_id: str = Field("", description="this bank's id; sent as x-yindian-bank-id in plain-text mode "
                                         "(with mTLS the link certificate identifies the bank: its CN "
                                         "when --bank-id is not given)")
    metrics_port: int = Field(9102, ge=0, le=PORT_MAX,
                              description="port of the Prometheus /metrics endpoint (0 picks one)")
    allow_client: NameList = Field(default_factory=list,
                                   description="another client identity admitted besides --bank-id (repeatable): "
                                               "certificate CN, or x-yindian-bank-id in plain text")

    # --- upstream calls ---
    upstream_deadline_cap_s: float = Field(5.0, gt=0, le=3_600,
                                           description="longest deadline of any call to mis_adapter; "
                                                       "also used when the caller set none")
    upstream_deadline_margin_s: float = Field(0.05, ge=0, le=60,
                                              description="kept back from the caller's remaining time "
                                                          "so the bridge can answer before it expires")
    upstream_deadline_min_s: float = Field(0.02, ge=0, le=60,
                                           description="a request with less time left than this is refused "
                                                       "with DEADLINE_EXCEEDED before journaling")
    upstream_health_interval_s: float = Field(1.0, gt=0, le=60, description="health check of each upstream "
                                                                            "replica (with more than one)")
    upstream_health_timeout_s: float = Field(1.0, gt=0, le=60, description="deadline of one replica health check")
    feed_failover_max_s: float = Field(60.0, gt=0, le=3_600,
                                       description="with replicas: how long the bill feed keeps trying to move "
                                                   "to a survivor (its dead replica's lease must lapse first)")
    feed_failover_retry_s: float = Field(0.5, gt=0, le=60,
                                         description="with replicas: pause between the feed's resubscriptions")
    upstream_max_message_bytes: int = Field(4 * 1024 * 1024, ge=1_024, le=MESSAGE_BYTES_MAX,
                                            description="message size limit on the link")

    # --- idempotency ---
    duplicate_wait_s: float = Field(2.0, ge=0, le=600, description="how long a duplicate of an in-flight serial "
                                                                   "waits for its original before getting ABORTED")

    # --- journal ---
    journal_batch_max: int = Field(256, ge=1, le=100_000,
                                   description="most outcomes recorded in one journal transaction")
    journal_queue_max: int = Field(4096, ge=1, le=10_000_000,
                                   description="outcomes waiting to be recorded before callers block")
    journal_idle_wait_s: float = Field(0.5, gt=0, le=60,
                                       description="how long the journal writer waits for work per loop")
    journal_linger_s: float = Field(0.005, ge=0, le=10,
                                    description="how long recorded outcomes (already answered) may wait "
                                                "to share a journal transaction with others")
    # 2 ms by default (session 13, bench-ratio on PostgreSQL, interleaved pairs against 0): the bridge's CPU per
    # pay 1.61 -> 1.48 ms open loop at 400/s (5 pairs) and 1.31 -> 1.15 ms closed loop (3 pairs), lower in each.
    journal_commit_linger_s: float = Field(0.002, ge=0, le=0.1,
                                           description="how long the journal writer, woken from idle, waits "
                                                       "for more work to share the commit when the recent "
                                                       "arrival rate brings at least one more item within it "
                                                       "(every pay's row and outcome wait at most this much for "
                                                       "company; at a slower pace none; 0: no wait, group "
                                                       "commit by queue only)")

    # --- in-doubt resolution ---
    resolver_enabled: bool = Field(True, description="run the background resolver of in-doubt requests")
    resolver_batch_max: int = Field(64, ge=1, le=100_000, description="in-doubt rows taken per resolver pass")
    resolver_idle_wait_s: float = Field(1.0, gt=0, le=3_600,
                                        description="resolver wait between passes when nothing is due")
    resolver_call_timeout_s: float = Field(3.0, gt=0, le=3_600,
                                           description="deadline of each resolver call to mis_adapter")
    resolver_backoff_initial_s: float = Field(0.2, gt=0, le=3_600,
                                              description="first retry delay of an unresolved row")
    resolver_backoff_cap_s: float = Field(10.0, gt=0, le=86_400,
                                          description="longest retry delay of an unresolved row")

    # --- link state (签到/签退) ---
    sign_on_at_start: bool = Field(True, description="sign the bank on at the utility when the bridge starts")
    sign_on_retry_initial_s: float = Field(0.5, gt=0, le=3_600,
                                           description="first retry delay of a failed sign-on at start")
    sign_on_retry_cap_s: float = Field(10.0, gt=0, le=86_400,
                                       description="longest retry delay of a failed sign-on at start")

    retryable_probe_after_s: float = Field(60.0, gt=0, le=86_400,
                                           description="a Pay refused for now (RETRYABLE) that the bank core has not "
                                                       "retried within this time is probed by the resolver like an "
                                                       "in-doubt one (GetPayment, then a tombstone if never posted)")

    # --- continuous reconciliation (bridge.control_totals) ---
    control_totals_enabled: bool = Field(True, description="exchange control totals with the utility while "
                                                           "serving")
    control_totals_interval_s: float = Field(10.0, gt=0, le=3_600,
                                             description="seconds between exchanges of control totals")
    control_totals_window_s: float = Field(30.0, ge=0, le=86_400,
                                           description="how long the control totals must differ before the "
                                                       "divergence is flagged (gauge, log): longer than an "
                                                       "in-doubt pay takes to resolve")
    control_totals_settle_s: float = Field(5.0, ge=0, le=3_600,
                                           description="only pays the utility posted at least this long before "
                                                       "an exchange count (covers clock skew between the sides)")
    control_totals_call_timeout_s: float = Field(5.0, gt=0, le=600,
                                                 description="deadline of one exchange of control totals")
    control_totals_in_doubt_max: int = Field(1_000, ge=0, le=1_000,
                                             description="in-doubt serials an exchange may leave out; with more "
                                                         "in doubt the exchange is skipped")
    control_totals_list_page_max: int = Field(1_000, ge=1, le=1_000,
                                              description="entries per page when listing the utility's serials "
                                                          "to name the differing ones")
    control_totals_list_pages_max: int = Field(200, ge=0, le=100_000,
                                               description="pages read per flagged divergence to name its "
                                                           "serials")
    control_totals_serials_logged: int = Field(10, ge=1, le=10,
                                               description="differing serials named in the log")
    control_totals_page_rows: int = Field(500, ge=10, le=10_000,
                                          description="journal rows per fetch of an exchange (its Python work "
                                                      "comes in slices of this many rows between round trips)")
    control_totals_rebuild_every: int = Field(60, ge=1, le=100_000,
                                              description="exchanges between two full reads of the journal's two "
                                                          "days (in between, each reads what changed)")

    @field_validator("upstream", mode="before")
    @classmethod
    def _upstream_list(cls, value: object) -> object:
        """One address, a comma-separated list, or a list (repeated flags, TOML array)."""
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list):
            return [a.strip() for part in items for a in str(part).split(",") if a.strip()]
        return value

    @model_validator(mode="after")
    def _backoff_in_order(self) -> Self:
        if self.resolver_backoff_initial_s > self.resolver_backoff_cap_s:
            raise ValueError("resolver_backoff_initial_s must not exceed resolver_backoff_cap_s")
        if self.sign_on_retry_initial_s > self.sign_on_retry_cap_s:
            raise ValueError("sign_on_retry_initial_s must not exceed sign_on_retry_cap_s")
        return self
