"""Concurrent upstream requests per provider: a queue of this worker's own, never the provider's fault.

Some providers (free tiers especially) allow only a few requests at once per account, and one
hot provider must not take every connection a worker has. So each provider whose catalog
profile names `limits.concurrent_requests` gets a semaphore per worker, and an attempt waits
for a slot *before* its clock starts: the wait counts against the request's own deadline, never
against the provider's connect or first-token timeout, its latency statistics or its breaker,
and it causes no failover (docs/failover.md, "Local waits"). Providers without a limit get no
semaphore at all (the upstream client's pool is unbounded too: a bounded pool would put this
worker's own wait inside the provider's timeouts again).
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from router.catalog import ProviderRuntime


class ProviderSlots:
    """One semaphore per provider with a concurrency limit, created on first use."""

    def __init__(self) -> None:
        self._slots: dict[str, asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def hold(self, provider: ProviderRuntime) -> AsyncIterator[None]:
        """Hold one of the provider's slots (waiting for it if they are all taken) for the block."""
        limit = provider.config.profile.limits.concurrent_requests
        if limit is None:
            yield
            return
        semaphore = self._slots.get(provider.id)
        if semaphore is None:
            semaphore = self._slots[provider.id] = asyncio.Semaphore(limit)
        async with semaphore:
            yield
