"""Look-up attempt limits, per client address and per account number, with
the `limits` library (moving windows in process memory). The memory is
bounded: at most `keys_max` addresses and accounts are tracked at once;
when the table is full a new one is refused as over the limit (fail
closed), so a flood of addresses or account numbers cannot grow the
process. Every attempt counts, found or not: counting only failures would
itself tell a real account from an absent one."""
from __future__ import annotations

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


class TableFull(Exception):
    pass


class BoundedMemoryStorage(MemoryStorage):
    """`limits`' memory storage with a cap on the number of keys (a moving
    window keeps at most `limit` entries per key, so memory is bounded)."""

    def __init__(self, keys_max: int) -> None:
        super().__init__()
        self.keys_max = keys_max

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if key not in self.events and len(self.events) >= self.keys_max:
            raise TableFull(key)
        return super().acquire_entry(key, limit, expiry, amount)


class AttemptLimiter:
    def __init__(self, per_client: str, per_account: str, keys_max: int) -> None:
        self.per_client: list[RateLimitItem] = parse_many(per_client)
        self.per_account: list[RateLimitItem] = parse_many(per_account)
        self.storage = BoundedMemoryStorage(keys_max)
        self.limiter = MovingWindowRateLimiter(self.storage)

    def _allow(self, items: list[RateLimitItem], *identifiers: str) -> bool:
        # Test every window first so a refused attempt consumes none of them.
        if not all(self.limiter.test(item, *identifiers) for item in items):
            return False
        try:
            return all([self.limiter.hit(item, *identifiers) for item in items])
        except TableFull:
            return False

    def allow_client(self, address: str) -> bool:
        return self._allow(self.per_client, "client", address)

    def allow_account(self, account_no: str) -> bool:
        return self._allow(self.per_account, "account", account_no)

    def tracked(self) -> int:
        return len(self.storage.events)
