"""Upstream key rotation: spread requests over a provider's keys."""

import itertools

from router.catalog import Deployment


class KeyRotation:
    """Round-robin over each provider's keys (quota-aware skipping builds on this)."""

    def __init__(self) -> None:
        self._cycles: dict[str, itertools.cycle[str]] = {}

    def pick(self, deployment: Deployment) -> str | None:
        keys = deployment.provider.api_keys
        if not keys:
            return None
        cycle = self._cycles.get(deployment.provider.id)
        if cycle is None:
            cycle = self._cycles[deployment.provider.id] = itertools.cycle(keys)
        return next(cycle)
