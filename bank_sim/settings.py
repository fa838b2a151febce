"""The bank core simulator's settings: one frozen object per command, built
in `main` from flags, YINDIAN_* environment variables and an optional TOML
file (yindian_common.settings), then passed down. Every bound the teller,
the demo and the benchmark obey is named here, with its default."""
from __future__ import annotations

from pydantic import Field

from yindian_common.settings import YinDianSettings


class LinkSettings(YinDianSettings):
    """How the bank core reaches its bridge (or, for comparison, mis_adapter)."""

    target: str = Field("127.0.0.1:50052", description="HOST:PORT of the bridge")
    bank_id: str = Field("ICBC", description="this bank's id (sent as metadata in plain-text mode)")
    insecure: bool = Field(False, description="plain text on loopback instead of mTLS")
    tls_cert: str | None = Field(None, description="client certificate (PEM)")
    tls_key: str | None = Field(None, description="client private key (PEM)")
    tls_ca: str | None = Field(None, description="CA that signed the server certificate (PEM)")
    rpc_deadline_s: float = Field(5.0, description="deadline of every call")
    retry_max_attempts: int = Field(30, description="attempts of an in-doubt call (same serial) before it stays in doubt")
    retry_backoff_base_s: float = Field(0.05, description="first back-off after an in-doubt answer")
    retry_backoff_cap_s: float = Field(2.0, description="longest back-off between attempts")


class TellerSettings(LinkSettings):
    """`python -m bank_sim teller`: counter customers served by teller sessions."""

    db: str = Field("sqlite:///var/bank_sim.db", description="the bank core's database URL")
    roster: str = Field("", description="the bank's agreement roster CSV (header line, account_no column)")
    sessions: int = Field(4, description="teller sessions working at once")
    customers: int = Field(200, description="customers served in total (each account at most once)")
    outlets: int = Field(3, description="outlets (网点) of the bank")
    tellers_per_outlet: int = Field(2, description="tellers at each outlet")
    cancel_ratio: float = Field(0.03, description="share of pays cancelled the same day (冲正)")
    low_balance_ratio: float = Field(0.15, description="share of passbooks opened with a too-low balance")
    seed: int = Field(20261128, description="random seed (customers, amounts, cancels, balances)")
    clock_start: str | None = Field(None, description="ISO instant the bank's clock starts at (default: now)")
    summary_json: str | None = Field(None, description="also write the summary as JSON to this file")
    latency_max_ms: int = Field(60_000, description="largest latency the histograms record")


class DemoSettings(YinDianSettings):
    """`python -m bank_sim demo-day` (`make run`): a business day on SQLite."""

    work_dir: str = Field("var/demo", description="work directory, emptied at the start of each run")
    accounts: int = Field(2000, description="households the utility is seeded with")
    customers: int = Field(300, description="counter customers served during the day")
    sessions: int = Field(4, description="teller sessions working at once")
    bank_id: str = Field("ICBC", description="the bank whose day is simulated")
    cancel_ratio: float = Field(0.03, description="share of pays cancelled the same day")
    clock_start: str | None = Field(None, description="ISO instant the day starts at (default: now)")
    summary_json: str | None = Field(None, description="also write the summary as JSON to this file")
    ready_timeout_s: float = Field(60.0, description="longest wait for a server's READY line")
    stop_timeout_s: float = Field(30.0, description="longest wait for a server to exit after SIGTERM")
    step_timeout_s: float = Field(300.0, description="longest a child command (seed) may run")
    branch_topology: bool = Field(False, description="run the day as the seed's utility does: a front database, "
                                                     "branch databases 02 and 03 beside the primary, and two "
                                                     "mis_adapter replicas behind the bridge")


class BenchCoreSettings(YinDianSettings):
    """`python -m bank_sim bench-core` (`make bench-core`)."""

    work_dir: str = Field("var/bench-core", description="work directory, emptied at the start of each run")
    accounts: int = Field(5000, description="households the utility is seeded with")
    bank_id: str = Field("ICBC", description="the paying bank")
    levels: str = Field("1,8,32,64", description="comma-separated numbers of pays in flight")
    level_duration_s: float = Field(10.0, description="how long each concurrency level runs")
    warmup_s: float = Field(1.0, description="unmeasured warm-up before each level")
    backends: str = Field("sqlite,postgresql", description="comma-separated back ends to measure")
    paths: str = Field("bridge,direct", description="comma-separated paths: through the bridge, straight to mis_adapter")
    pg_admin_url: str = Field("postgresql://postgres@127.0.0.1:5432/postgres",
                              description="PostgreSQL server to create the benchmark databases on")
    rpc_deadline_s: float = Field(10.0, description="deadline of every pay")
    ready_timeout_s: float = Field(60.0, description="longest wait for a server's READY line")
    stop_timeout_s: float = Field(30.0, description="longest wait for a server to exit after SIGTERM")
    latency_max_ms: int = Field(60_000, description="largest latency the histograms record")
