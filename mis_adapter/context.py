"""AdapterContext: what every mis_adapter request handler needs, built once
in `serve` and passed down: settings, clock, branch router, late-fee rates,
the bank registry and the bill feed's hub. It knows nothing of gRPC: who is
calling is read from the link at the edge (mis_adapter.service)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mis_adapter.banks import BankRegistry
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.routing import BranchRouter
from mis_adapter.settings import AdapterSettings
from yindian_common.clock import Clock

if TYPE_CHECKING:  # the hub lives at the feed's edge, which imports this module
    from mis_adapter.feed_service import FeedHub


@dataclass
class AdapterContext:
    settings: AdapterSettings
    clock: Clock
    router: BranchRouter
    rates: LateFeeRates
    banks: BankRegistry
    # The bill feed's per-process hub: set by `serve` when it builds the
    # context (None with branch databases, where the feed is refused, and in
    # tests that build a context without serving the feed).
    feed_hub: FeedHub | None = None

    def close(self) -> None:
        """After the drain: stop the feed's listener, close the database pools."""
        if self.feed_hub is not None:
            self.feed_hub.stop()
        self.router.dispose()

    @property
    def tls(self) -> bool:
        return self.settings.tls() is not None

    @classmethod
    def build(cls, settings: AdapterSettings, clock: Clock) -> AdapterContext:
        router = BranchRouter.from_specs(settings.db, settings.branch_db, pool_size=settings.db_pool_size,
                                         pool_timeout_s=settings.db_pool_timeout_s,
                                         sqlite_synchronous=settings.sqlite_synchronous,
                                         front_url=settings.front_db)
        banks = BankRegistry(router.primary, ttl_s=settings.bank_status_ttl_s,
                             concurrency_max=settings.bank_concurrency_max)
        return cls(settings, clock, router, settings.late_fee_rates(), banks)
