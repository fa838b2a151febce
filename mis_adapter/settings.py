"""mis_adapter's one settings object (flags > YINDIAN_* env > TOML > defaults).
What both servers share (TLS, clock, time zone, server limits, pool) comes
from yindian_common.settings.ServerSettings; every number is range-checked."""
from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from mis_adapter.late_fee import LateFeeRates
from yindian_common.settings import PORT_MAX, NameList, SealingServerSettings

PPM_MAX = 1_000_000          # a late fee of 100 % a day is already absurd
FEE_FEN_MAX = 10**9


class AdapterSettings(SealingServerSettings):
    db: str = Field("sqlite:///var/mis.db", description="SQLAlchemy URL of the MIS database (all branches)")
    branch_db: list[str] = Field(default_factory=list,
                                 description="CODE=URL: branch CODE's database (repeatable); others use --db")
    front_db: str = Field("", description="front database URL: each bank's serial registry across branch "
                                          "databases (default: --db, when --branch-db splits the MIS)")
    listen: str = Field("127.0.0.1:50051", description="gRPC listen address HOST:PORT")
    metrics_port: int = Field(9101, ge=0, le=PORT_MAX, description="Prometheus endpoint port (0 picks one)")
    migrate: bool = Field(True, description="upgrade the schema at start")
    db_pool_timeout_s: float = Field(5.0, gt=0, le=300, description="wait for a pooled connection before "
                                                                    "UNAVAILABLE")
    db_wait_max_s: float = Field(10.0, gt=0, le=3_600, description="longest database wait (lock, statement) of "
                                                                 "a call without a shorter deadline")
    db_stream_connections_max: int = Field(0, ge=0, le=1_024, description="database connections streams "
                                                                       "(Reconcile) may hold at once; 0: a quarter "
                                                                       "of the pool")
    db_bank_stream_connections_max: int = Field(0, ge=0, le=1_024, description="database connections one bank's "
                                                                            "streams may hold; 0: half the streams' "
                                                                            "share")
    recon_peer_silence_s: float = Field(60.0, gt=0, le=86_400,
                                        description="Reconcile: end a stream whose bank sends nothing for this "
                                                    "long (DEADLINE_EXCEEDED RECON_PEER_SILENT, nothing applied)")
    db_health_interval_s: float = Field(2.0, gt=0, le=3_600, description="how often health probes the database "
                                                                         "(NOT_SERVING while unreachable)")
    pay_portable_sql: bool = Field(False, description="Pay with the portable statements on PostgreSQL too "
                                                       "(comparison and diagnosis; slower)")
    pay_pg_function: bool = Field(True, description="Pay on PostgreSQL in one round trip, the function yd_pay "
                                                     "(migration 0004_pay_function); off: two round trips, the "
                                                     "allocation in Python (pay_pg.PayTx)")
    pay_batch_max: int = Field(1, ge=1, le=256,
                               description="Pay on PostgreSQL: pays waiting at the same moment called together, "
                                           "in one round trip and one commit (yd_pay_many, migration "
                                           "0004_paybatch_pay_many), at most this many (e.g. 16); 1 (the "
                                           "default): every pay alone. Cuts the database server's CPU and "
                                           "commits per pay, not the whole machine's (README)")
    pay_batch_callers: int = Field(2, ge=1, le=1_024,
                                   description="Pay on PostgreSQL with pay_batch_max > 1: lone pays and batches in "
                                               "progress at once per database (at most --db-pool-size); a pay "
                                               "arriving when all are busy waits, within its deadline, to join "
                                               "the next batch")
    money_workers: int = Field(0, ge=0, le=4_096,
                               description="threads serving the money-moving calls (Pay, Cancel), apart from the "
                                           "server's --max-workers; 0: one per pays' database connection "
                                           "(--db-pool-size per database), beyond which a thread would only "
                                           "wait for one")
    bank_concurrency_max: int = Field(64, ge=1, le=100_000, description="money-moving calls in progress per bank")
    bank_status_ttl_s: float = Field(1.0, ge=0, le=3_600, description="how long a bank's suspended flag is cached")
    query_bills_max: int = Field(120, ge=1, le=10_000,
                                 description="unpaid bills listed by QueryAccount (totals cover all)")
    cancel_race_retries: int = Field(3, ge=0, le=100, description="retries of a cancel that raced its payment")
    residential_ppm_per_day: int = Field(1_000, ge=0, le=PPM_MAX, description="late fee, residential, per day "
                                                                              "(ppm)")
    other_current_year_ppm_per_day: int = Field(2_000, ge=0, le=PPM_MAX,
                                                description="late fee, others, current-year arrears")
    other_earlier_years_ppm_per_day: int = Field(3_000, ge=0, le=PPM_MAX,
                                                 description="late fee, others, earlier years' arrears")
    late_fee_minimum_fen: int = Field(100, ge=0, le=FEE_FEN_MAX, description="minimum late fee once any accrues")
    feed_window_max: int = Field(20_000, ge=1, le=1_000_000,
                                 description="bill feed: notices outstanding past the contiguous ack")
    feed_notice_batch_max: int = Field(2_500, ge=1, le=100_000,
                                       description="bill feed: notices per stream message")
    feed_results_batch_max: int = Field(5_000, ge=1, le=100_000,
                                        description="bill feed: debit results accepted per message")
    feed_apply_batch_max: int = Field(10_000, ge=1, le=100_000,
                                      description="bill feed: results of queued messages posted in one transaction")
    feed_results_queue_max: int = Field(8, ge=1, le=1_000,
                                        description="bill feed: result messages received and waiting to be posted")
    feed_apply_partitions: int = Field(2, ge=1, le=16,
                                       description="bill feed, PostgreSQL: connections posting a batch's results at "
                                                   "once, split by account (1: one transaction)")
    feed_heartbeat_s: float = Field(5.0, gt=0, le=3_600,
                                    description="bill feed: heartbeat (and lease renewal) interval")
    feed_poll_interval_s: float = Field(0.2, gt=0, le=60,
                                        description="bill feed: outbox poll interval without LISTEN/NOTIFY")
    feed_lease_ttl_s: float = Field(15.0, gt=0, le=3_600,
                                    description="bill feed: a dead replica's stream lease lapses after this")
    feed_peer_silence_s: float = Field(120.0, gt=0, le=86_400,
                                       description="bill feed: end a stream with no results for this long")
    registry_recover_batch_max: int = Field(10_000, ge=1, le=10_000_000,
                                            description="front registry: open claims looked at per recovery "
                                                        "pass (at start, then every registry_recover_interval_s)")
    registry_recover_interval_s: float = Field(60.0, gt=0, le=86_400,
                                               description="front registry: seconds between recovery passes")
    registry_claim_expiry_s: float = Field(600.0, ge=60, le=7 * 86_400,
                                           description="front registry: an open claim with nothing in its "
                                                       "branch this old is released (must exceed the longest "
                                                       "a Pay can take)")

    arrears_snapshot_interval_s: float = Field(600.0, ge=0, le=86_400,
                                               description="arrears snapshots: seconds between serve's passes "
                                                           "that snapshot the newest day every bank has closed "
                                                           "(0: off; `mis_adapter arrears-snapshot` still works)")
    arrears_snapshots_keep_days: int = Field(7, ge=1, le=366, description="arrears snapshots: the newest kept")
    arrears_snapshot_month_ends_keep: int = Field(13, ge=0, le=120,
                                                  description="arrears snapshots: month ends kept (past-date "
                                                              "reports read the newest on or before their date)")

    # Customer channels (CustomerService) and ReportService: utility operator identities, never banks.
    operators: NameList = Field(default_factory=list,
                                 description="utility operator NAME allowed operator RPCs (repeatable; "
                                             "mTLS CN/SAN, or x-yindian-operator metadata in plain text)")
    factorless_operators: NameList = Field(default_factory=list,
                                            description="operators that may read an account overview without "
                                                        "the phone factor (the IVR; repeatable)")
    dunning_operators: NameList = Field(default_factory=list,
                                         description="operators that may list dunning candidates (full phone "
                                                     "numbers), record attempts and opt-outs (repeatable)")
    dunning_attempts_list_max: int = Field(1_000, ge=1, le=100_000,
                                           description="dunning attempts returned per ListDunningAttempts")

    # --- continuous reconciliation (ExchangeControlTotals) ---
    control_totals_window_s: float = Field(30.0, ge=0, le=86_400,
                                           description="how long a bank's control totals must differ from its "
                                                       "bridge's before the divergence is flagged (gauge, log)")
    control_totals_in_doubt_max: int = Field(1_000, ge=0, le=1_000,
                                             description="in-doubt serials an exchange of control totals may "
                                                         "leave out (more: INVALID_ARGUMENT in_doubt_serials)")
    control_totals_list_max: int = Field(1_000, ge=1, le=1_000,
                                         description="most per-serial entries one exchange lists")

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> Self:
        if self.feed_lease_ttl_s <= self.feed_heartbeat_s:
            raise ValueError("feed_lease_ttl_s must be longer than feed_heartbeat_s (the lease is renewed "
                             "with each heartbeat)")
        return self

    def late_fee_rates(self) -> LateFeeRates:
        return LateFeeRates(self.residential_ppm_per_day, self.other_current_year_ppm_per_day,
                            self.other_earlier_years_ppm_per_day, self.late_fee_minimum_fen)
