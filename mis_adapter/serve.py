"""`python -m mis_adapter serve`: the utility's front end process."""
from __future__ import annotations

import argparse
import logging

from mis_adapter import arrears_snapshot, link_state, metrics_collector, refunds
from mis_adapter.claim_recovery import ClaimRecovery
from mis_adapter.context import AdapterContext
from mis_adapter.customer_service import CustomerServicer, add_operator_flags
from mis_adapter.db.audit import JOURNAL_CHAIN
from mis_adapter.db_health import DatabaseWatch
from mis_adapter.feed import FeedSettings
from mis_adapter.feed_service import FeedHub
from mis_adapter.migrate import upgrade
from mis_adapter.report_service import ReportServicer
from mis_adapter.service import BillingServicer
from mis_adapter.settings import AdapterSettings
from yindian.v1 import billing_pb2_grpc, customer_pb2_grpc, report_pb2_grpc
from yindian_common import crash_points
from yindian_common.audit_chain import Sealer
from yindian_common.clock import Clock, make_clock
from yindian_common.gc_pauses import freeze_startup_heap
from yindian_common.logs import setup_logging
from yindian_common.metrics import grpc_server_interceptors, start_metrics_http
from yindian_common.rpc_pools import CallPool
from yindian_common.server import GrpcServer
from yindian_common.settings import add_settings_flags, parse_settings
from yindian_common.tls import certificate_store

log = logging.getLogger("mis_adapter")


def parse(argv: list[str]) -> AdapterSettings:
    parser = argparse.ArgumentParser(prog="python -m mis_adapter serve",
                                     description="Serve BillingService and ReportService to the banks, "
                                                 "CustomerService to the utility's own channels.")
    add_settings_flags(parser, AdapterSettings)
    add_operator_flags(parser)
    return parse_settings(parser, AdapterSettings, argv)


def build_server(settings: AdapterSettings, clock: Clock | None = None) -> tuple[GrpcServer, AdapterContext]:
    clock = clock or make_clock(settings.clock_start or None, settings.timezone)
    ctx = AdapterContext.build(settings, clock)
    if len(ctx.router.engines()) == 1:  # the feed serves one database only (mis_adapter.feed)
        ctx.feed_hub = FeedHub(ctx.router.primary, FeedSettings.from_adapter_settings(settings))
    if settings.migrate:
        for engine in ctx.router.all_engines():
            upgrade(engine)
    try:
        refunds.databases_of(ctx.router.database_keys(), ctx.router.engines())
    except ValueError as exc:
        ctx.close()
        raise SystemExit(f"--branch-db: {exc}") from exc
    recovery = ClaimRecovery(ctx.router, clock, settings) if ctx.router.split else None
    if recovery is not None:
        recovery.run_once()  # settle or release claims a killed process left open
        for view in link_state.link_states(ctx.router.primary):  # heal a sign-on/off a crash left half-mirrored
            if view.changed_at is None:
                continue  # never signed on or off, refund mode never set: nothing to copy
            for engine in ctx.router.engines()[1:]:
                link_state.mirror(engine, view)
    server = GrpcServer(listen=settings.listen, limits=settings.server_limits(), tls=settings.tls(),
                        insecure=settings.insecure, force_insecure=settings.force_insecure,
                        interceptors=grpc_server_interceptors(), cert_store=certificate_store(settings))
    # Pay and Cancel on threads of their own, as many as the pays' connections (settings.money_workers).
    money_workers = settings.money_workers or settings.db_pool_size * len(ctx.router.engines())
    money_pool = CallPool(max_workers=money_workers, thread_name_prefix="money")
    server.add_service("yindian.v1.BillingService", billing_pb2_grpc.add_BillingServiceServicer_to_server,
                       BillingServicer(ctx, money_pool))
    server.add_service("yindian.v1.ReportService", report_pb2_grpc.add_ReportServiceServicer_to_server,
                       ReportServicer(ctx))
    # Customer channels (portal, ivr): utility operators only, never relayed by a bridge.
    server.add_service("yindian.v1.CustomerService", customer_pb2_grpc.add_CustomerServiceServicer_to_server,
                       CustomerServicer(ctx))
    watch = DatabaseWatch(ctx.router.all_engines(), server.set_serving, settings.db_health_interval_s)
    watch.start()
    server.on_drain(watch.stop)
    if recovery is not None:
        recovery.start()
        server.on_drain(recovery.stop)
    if settings.arrears_snapshot_interval_s > 0:
        snapshots = arrears_snapshot.SnapshotJob(
            ctx.router.engines(), clock, settings.arrears_snapshot_interval_s,
            arrears_snapshot.Retention(settings.arrears_snapshots_keep_days, settings.arrears_snapshot_month_ends_keep),
            ctx.rates)
        snapshots.start()
        server.on_drain(snapshots.stop)
    server.on_drain(lambda: money_pool.shutdown(wait=False, cancel_futures=True))
    server.on_drain(ctx.close)
    return server, ctx


def main(argv: list[str]) -> int:
    settings = parse(argv)
    setup_logging(settings.log_level, "mis_adapter")
    crash_points.arm(settings.crash_point)
    server, _ctx = build_server(settings)
    metrics_collector.register(_ctx.router.engines(), _ctx.clock)
    sealer = Sealer([(JOURNAL_CHAIN, e) for e in _ctx.router.role_engines(_ctx.router.engines(), "sealer")],
                    settings.audit_seal_interval_s, _ctx.clock.now, batch_max=settings.audit_seal_batch_max,
                    batches_per_pass=settings.audit_seal_batches_per_pass)
    sealer.start()
    server.on_drain(sealer.stop)
    metrics_port = start_metrics_http(settings.metrics_host, settings.metrics_port)
    freeze_startup_heap()
    server.serve_forever(f"READY mis_adapter grpc={settings.listen.rsplit(':', 1)[0]}:{server.port} "
                         f"metrics={metrics_port}")
    return 0
