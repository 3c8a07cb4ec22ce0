"""Upstream key rotation that skips banned and exhausted keys, and x-ratelimit-* parsing."""

import itertools
import re
import time
from collections.abc import Mapping

from router.catalog import Deployment
from router.health import HealthSnapshot

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset_s(value: str) -> float | None:
    """A reset hint in seconds: '7.66s', '2m59.56s', '1h2m', '250ms', a bare number of seconds,
    or a unix timestamp (seconds or milliseconds, as OpenRouter sends)."""
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            return None
        scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
        return sum(float(n) * scale[u] for n, u in parts)
    now = time.time()
    if number > 1e12:  # epoch milliseconds
        return max(number / 1000 - now, 0.0)
    if number > 1e9:  # epoch seconds
        return max(number - now, 0.0)
    return max(number, 0.0)


def _header(headers: Mapping[str, str], *names: str) -> str | None:
    lowered = {k.lower(): v for k, v in headers.items()}
    return next((lowered[n] for n in names if n in lowered), None)


def quota_from_headers(headers: Mapping[str, str], at_ms: int) -> dict[str, str | int] | None:
    """Key state fields from x-ratelimit-* response headers (None when the provider sent none)."""
    remaining = _header(headers, "x-ratelimit-remaining-requests", "x-ratelimit-remaining")
    limit = _header(headers, "x-ratelimit-limit-requests", "x-ratelimit-limit")
    remaining_tokens = _header(headers, "x-ratelimit-remaining-tokens")
    if remaining is None and remaining_tokens is None:
        return None
    state: dict[str, str | int] = {"exhausted_until_ms": 0}
    try:
        if remaining is not None:
            state["remaining_requests"] = int(float(remaining))
        if limit is not None:
            state["limit_requests"] = int(float(limit))
        tokens_left = int(float(remaining_tokens)) if remaining_tokens is not None else None
    except ValueError:
        return None
    reset_s: float | None = None
    if state.get("remaining_requests") == 0:
        reset = _header(headers, "x-ratelimit-reset-requests", "x-ratelimit-reset")
        reset_s = parse_reset_s(reset) if reset else None
    elif tokens_left == 0:
        reset = _header(headers, "x-ratelimit-reset-tokens")
        reset_s = parse_reset_s(reset) if reset else None
    if reset_s is not None and reset_s > 0:
        state["exhausted_until_ms"] = at_ms + int(reset_s * 1000)
    return state


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
