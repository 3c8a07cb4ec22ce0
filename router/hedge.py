"""Hedged first token: when to start the next candidate beside a slow one, and how often one may.

A first token much later than the deployment's own recent ones says more than a fixed timeout:
after `multiplier` × its p95 time to first token (bounded by a floor and a cap; the cap when it
has no history yet) the next candidate starts in parallel, and whichever attempt produces a token
first serves the request (router/failover.py; the loser is cancelled before any of its bytes
reach the caller). A hedge doubles one request's upstream cost, so hedges are bounded: per
deployment and per worker, at most `max_share` of the requests it got in the last minute
(at least one a minute, so a quietly used deployment can be hedged at all).
"""

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from router.keyspace import DeploymentHealth

_WINDOW_S = 60.0


@dataclass(frozen=True)
class HedgeTuning:
    """The numbers behind hedging, from settings."""

    enabled: bool = True
    multiplier: float = 2.0
    min_s: float = 1.0
    max_s: float = 8.0
    max_share: float = 0.05


class HedgePolicy:
    """One worker's hedge thresholds and budget (counts live in memory: no Redis round trip)."""

    def __init__(self, tuning: HedgeTuning, clock: Callable[[], float] = time.monotonic) -> None:
        self.tuning = tuning
        self._clock = clock
        self._requests: dict[str, collections.deque[float]] = {}
        self._hedges: dict[str, collections.deque[float]] = {}

    def threshold_s(self, health: DeploymentHealth) -> float:
        """How long to wait for this deployment's first token before hedging."""
        t = self.tuning
        p95_ms = health.ttft_p95_ms()
        if p95_ms is None:
            return t.max_s
        return min(max(p95_ms * t.multiplier / 1000, t.min_s), t.max_s)

    def started(self, deployment: str) -> None:
        """An attempt on this deployment began (the budget is a share of these)."""
        self._recent(self._requests, deployment).append(self._clock())

    def may_hedge(self, deployment: str) -> bool:
        """Whether a slow first token of this deployment may start a hedge now."""
        if not self.tuning.enabled:
            return False
        requests = len(self._recent(self._requests, deployment))
        return len(self._recent(self._hedges, deployment)) < max(1.0, self.tuning.max_share * requests)

    def hedged(self, deployment: str) -> None:
        """A hedge was started because this deployment was slow."""
        self._recent(self._hedges, deployment).append(self._clock())

    def _recent(self, table: dict[str, collections.deque[float]], deployment: str) -> collections.deque[float]:
        times = table.setdefault(deployment, collections.deque())
        cutoff = self._clock() - _WINDOW_S
        while times and times[0] < cutoff:
            times.popleft()
        return times
