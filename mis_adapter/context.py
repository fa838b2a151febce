"""AdapterContext: what every mis_adapter request handler needs, built once
in `serve` and passed down: settings, clock, branch router, late-fee rates,
the bank registry, and the link's identity of the caller."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from mis_adapter.banks import BankRegistry
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.routing import BranchRouter
from mis_adapter.settings import AdapterSettings
from yindian_common.clock import Clock
from yindian_common.identity import bank_of


@dataclass
class AdapterContext:
    settings: AdapterSettings
    clock: Clock
    router: BranchRouter
    rates: LateFeeRates
    banks: BankRegistry
    # The bill feed's per-process hub (mis_adapter.feed_service.FeedHub), created on first use.
    feed_hub: Any = None

    def close(self) -> None:
        """After the drain: stop the feed's listener, close the database pools."""
        if self.feed_hub is not None:
            self.feed_hub.stop()
        self.router.dispose()

    @property
    def tls(self) -> bool:
        return self.settings.tls() is not None

    def bank_of(self, context: grpc.ServicerContext) -> str:
        """The calling bank, from the link (certificate, or metadata in plain-text mode)."""
        return bank_of(context, tls=self.tls)

    @classmethod
    def build(cls, settings: AdapterSettings, clock: Clock) -> AdapterContext:
        router = BranchRouter.from_specs(settings.db, settings.branch_db, pool_size=settings.db_pool_size,
                                         pool_timeout_s=settings.db_pool_timeout_s,
                                         sqlite_synchronous=settings.sqlite_synchronous,
                                         front_url=settings.front_db)
        banks = BankRegistry(router.primary, ttl_s=settings.bank_status_ttl_s,
                             concurrency_max=settings.bank_concurrency_max)
        return cls(settings, clock, router, settings.late_fee_rates(), banks)
