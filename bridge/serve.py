"""`python -m bridge serve`: the bank's front end process. Builds the journal,
its writer, the resolver and the upstream channel, serves BillingService to
the bank core, and on SIGTERM drains calls, stops the resolver and flushes
the journal before exiting."""
from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

import grpc
import sqlalchemy as sa

from bridge import metrics_collector
from bridge.context import BridgeContext
from bridge.control_totals import ControlTotalsExchanger, ExchangeLimits
from bridge.journal import Claims, Journal, JournalWriter, create_schema
from bridge.journal.audit_chain import AUDIT_CHAIN
from bridge.link_relay import relay_of
from bridge.replicas import ReplicaSet
from bridge.resolver import Backoff, Resolver
from bridge.service import BillingServicer
from bridge.settings import BridgeSettings
from yindian.v1 import billing_pb2_grpc
from yindian_common import crash_points, fields
from yindian_common.audit_chain import Sealer
from yindian_common.clock import Clock, make_clock
from yindian_common.db import DB_WAIT_MAX_S, make_engine, role_name
from yindian_common.errors import InvalidField
from yindian_common.gc_pauses import freeze_startup_heap
from yindian_common.identity import HEALTH_PREFIX, AdmissionInterceptor
from yindian_common.logs import setup_logging
from yindian_common.metrics import grpc_server_interceptors, start_metrics_http
from yindian_common.server import GrpcServer, open_channel
from yindian_common.settings import add_settings_flags, parse_settings
from yindian_common.tls import certificate_identity, certificate_store

log = logging.getLogger("yindian.bridge")

STOP_TIMEOUT_S = 10.0
# PostgreSQL application_name of the serving pool's connections; background roles add "/<role>".
PROCESS_NAME = "bridge"
# Connections of a background role's own pool (one thread each).
ROLE_POOL_SIZE = 2


def parse(argv: list[str]) -> BridgeSettings:
    parser = argparse.ArgumentParser(
        prog="python -m bridge serve",
        description="Serve BillingService to the bank core; journal and forward to mis_adapter over the link.")
    add_settings_flags(parser, BridgeSettings)
    return parse_settings(parser, BridgeSettings, argv)


def check_settings(settings: BridgeSettings) -> BridgeSettings:
    """The settings with this bank's id known: --bank-id, or under mTLS the
    bridge's own certificate's identity (the utility sees the same); the two
    must agree, or the journal would name another bank than the link."""
    tls = settings.tls()
    if tls is None and not settings.bank_id:
        raise SystemExit("--bank-id is required in plain-text mode")
    if tls is not None:
        own = certificate_identity(tls.cert)
        if settings.bank_id and settings.bank_id != own:
            raise SystemExit(f"--bank-id {settings.bank_id} differs from the identity of --tls-cert ({own!r})")
        settings = settings.model_copy(update={"bank_id": own})
    try:
        fields.code(settings.bank_id, "bank_id", required=True)
        for name in settings.allow_client:
            fields.code(name, "allow_client", required=True)
    except InvalidField as err:
        raise SystemExit(f"--{err.field.replace('_', '-') if err.field else 'bank-id'}: {err.message}") from err
    return settings


class Bridge:
    """The assembled bridge: server, journal writer and resolver."""

    def __init__(self, settings: BridgeSettings, clock: Clock | None = None) -> None:
        settings = check_settings(settings)
        self.settings = settings
        clock = clock or make_clock(settings.clock_start or None, settings.timezone)
        _ensure_sqlite_dir(settings.db)
        # A server database's sessions bound their lock waits (DB_WAIT_MAX_S) and their idle
        # transactions (DB_IDLE_IN_TX_MAX_S), as mis_adapter's do: a transaction stranded by a dead
        # link or a frozen process would otherwise hold its journal rows' locks, and the writer's
        # retry of that batch would wait on them, for as long as the server keeps the session.
        # SQLite keeps its busy timeout (SQLITE_BUSY_TIMEOUT_MS).
        wait_max_s = None if settings.db.startswith("sqlite") else DB_WAIT_MAX_S
        engine = make_engine(settings.db, pool_size=settings.db_pool_size, wait_max_s=wait_max_s,
                             sqlite_synchronous=settings.sqlite_synchronous, application_name=PROCESS_NAME)
        # PostgreSQL: the background roles on small pools of their own, named in pg_stat_activity
        # (bench-ratio's CPU by role); the journal writer names its own connection (Journal).
        self._role_engines = {role: make_engine(settings.db, pool_size=ROLE_POOL_SIZE, wait_max_s=wait_max_s,
                                                application_name=role_name(PROCESS_NAME, role))
                              for role in ("sealer", "resolver") if engine.dialect.name == "postgresql"}
        create_schema(engine)
        journal = Journal(engine)
        recovered = journal.recover_orphans(clock.now())
        if recovered:
            log.warning("event=recovered_pending rows=%d state=SUSPECT", recovered)
        claims = Claims()
        writer = JournalWriter(journal, claims, clock, batch_max=settings.journal_batch_max,
                               queue_max=settings.journal_queue_max, idle_wait_s=settings.journal_idle_wait_s,
                               linger_s=settings.journal_linger_s,
                               commit_linger_s=settings.journal_commit_linger_s)
        def channel(address: str) -> grpc.Channel:
            # Plain: each replica instruments it (bridge.replicas), its unary calls are counted by bridge.upstream.
            return open_channel(address, tls=settings.tls(), insecure=settings.insecure,
                                force_insecure=settings.force_insecure,
                                max_message_bytes=settings.upstream_max_message_bytes)

        try:
            replicas = ReplicaSet(settings.upstream, channel, health_interval_s=settings.upstream_health_interval_s,
                                  health_timeout_s=settings.upstream_health_timeout_s)
        except ValueError as err:
            raise SystemExit(f"--upstream: {err}") from err
        self.ctx = BridgeContext(settings=settings, clock=clock, engine=engine, journal=journal, writer=writer,
                                 claims=claims, replicas=replicas)
        resolver_engine = self._role_engines.get("resolver")
        self.resolver = Resolver(
            journal=journal if resolver_engine is None else Journal(resolver_engine), writer=writer, claims=claims, upstream=self.ctx.upstream, clock=clock,
            bank_id=settings.bank_id,
            backoff=Backoff(settings.resolver_backoff_initial_s, settings.resolver_backoff_cap_s),
            batch_max=settings.resolver_batch_max, idle_wait_s=settings.resolver_idle_wait_s,
            call_timeout_s=settings.resolver_call_timeout_s, min_call_s=settings.upstream_deadline_min_s)
        self.server = GrpcServer(listen=settings.listen, limits=settings.server_limits(), tls=settings.tls(),
                                 insecure=settings.insecure, force_insecure=settings.force_insecure,
                                 interceptors=grpc_server_interceptors(), cert_store=certificate_store(settings),
                                 guards=[AdmissionInterceptor(self.ctx.admit, exempt_prefixes=(HEALTH_PREFIX,))])
        self.server.add_service("yindian.v1.BillingService", billing_pb2_grpc.add_BillingServiceServicer_to_server,
                                BillingServicer(self.ctx, self.resolver))
        self.server.on_drain(self._after_drain)
        self.sealer = Sealer([(AUDIT_CHAIN, self._role_engines.get("sealer", engine))], settings.audit_seal_interval_s,
                             clock.now, batch_max=settings.audit_seal_batch_max,
                             batches_per_pass=settings.audit_seal_batches_per_pass)
        self.control_totals = ControlTotalsExchanger(engine, self.ctx.upstream, clock, settings.bank_id, ExchangeLimits(
            interval_s=settings.control_totals_interval_s, window_s=settings.control_totals_window_s,
            settle_s=settings.control_totals_settle_s, call_timeout_s=settings.control_totals_call_timeout_s,
            in_doubt_max=settings.control_totals_in_doubt_max, list_page_max=settings.control_totals_list_page_max,
            list_pages_max=settings.control_totals_list_pages_max,
            serials_logged=settings.control_totals_serials_logged, page_rows=settings.control_totals_page_rows,
            rebuild_every=settings.control_totals_rebuild_every))
        self._drained = False
        self._link = relay_of(self.ctx)  # its journal table exists before the first call
        self._stop_sign_on = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.settings.listen.rsplit(':', 1)[0]}:{self.server.port}"

    def start_workers(self) -> None:
        self.ctx.replicas.start()
        self.ctx.writer.start()
        self.sealer.start()
        if self.settings.resolver_enabled:
            self.resolver.start()
        if self.settings.control_totals_enabled:
            self.control_totals.start()
        if self.settings.sign_on_at_start:
            self._link.sign_on_at_start(self._stop_sign_on, initial_s=self.settings.sign_on_retry_initial_s,
                                        cap_s=self.settings.sign_on_retry_cap_s,
                                        call_timeout_s=self.settings.resolver_call_timeout_s)

    def start(self) -> None:
        """Serves without signal handling (in-process use, tests)."""
        self.start_workers()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def _after_drain(self) -> None:
        if self._drained:
            return
        self._drained = True
        self._stop_sign_on.set()
        self.control_totals.stop(STOP_TIMEOUT_S)
        self.resolver.stop(STOP_TIMEOUT_S)
        self.ctx.writer.stop(STOP_TIMEOUT_S)
        self.sealer.stop()
        self.ctx.replicas.close()
        self.ctx.engine.dispose()
        for own in self._role_engines.values():
            own.dispose()


def _ensure_sqlite_dir(url: str) -> None:
    """The default journal lives under var/: create its directory on first start."""
    u = sa.make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)


def main(argv: list[str]) -> int:
    settings = parse(argv)
    setup_logging(settings.log_level, "bridge")
    crash_points.arm(settings.crash_point)
    bridge = Bridge(settings)
    settings = bridge.settings  # the bank id is known now, also under mTLS
    metrics_collector.register(bridge.ctx.engine, bridge.ctx.clock, settings.bank_id)
    metrics_port = start_metrics_http(settings.metrics_host, settings.metrics_port)
    bridge.start_workers()
    log.info("event=start bank=%s upstream=%s listen=%s", settings.bank_id, ",".join(settings.upstream),
             bridge.address)
    freeze_startup_heap()
    bridge.server.serve_forever(f"READY bridge grpc={bridge.address} metrics={metrics_port}")
    return 0
