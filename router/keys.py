"""Upstream key rotation that skips banned and exhausted keys (rate-limit headers: router/providers/limits.py)."""

import itertools

from router.catalog import Deployment
from router.health import HealthSnapshot


class KeyRotation:
    """Round-robin over each provider's usable keys (banned and exhausted keys are skipped)."""

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def pick(self, deployment: Deployment, health: HealthSnapshot | None = None) -> str | None:
        """The next key to use, or None for keyless providers. Raises NoUsableKey when all are out."""
        keys = deployment.provider.api_keys
        if not keys:
            return None
        usable = health.usable_keys(deployment) if health is not None else list(keys)
        if not usable:
            raise NoUsableKey(deployment.provider.id)
        counter = self._counters.setdefault(deployment.provider.id, itertools.count())
        return usable[next(counter) % len(usable)]


class NoUsableKey(Exception):
    """Every key of the provider is banned or out of quota right now."""
