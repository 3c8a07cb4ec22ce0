"""Prompt recovery: a primary that was down for a long time serves again soon after it recovers.

Steady traffic from one caller, two workers sharing the breaker. The breaker's cooldown grows
with each failed probe only up to its cap, so probes go on at least every cap (jittered) however
long the outage lasts, and the first probe after the recovery closes the breaker for everyone.
Outcomes, not durations: the fallback answers every request during the outage, the primary is
probed, not hammered, and probing does not stall late in the outage; the primary serves again
within a number of requests far below what a growing cooldown would have cost.
"""

import time
from collections.abc import Callable

import pytest

from tests.integration.test_failover_support import FAST_ENV, ask, failover_catalog, forget_health
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

BEST, BACKUP = "general-best", "general-backup"


def outage(gateway: Gateway, upstream: FakeUpstream, seconds: float, trickle_s: float) -> tuple[list[str], list[float]]:
    """The primary answers 503 for `seconds` of steady traffic: (who served each request, the
    primary's hits as seconds since the outage began)."""
    key = gateway.create_key("free")
    forget_health(gateway)
    upstream.reset()
    assert ask(gateway, key, stream=False).model == BEST
    upstream.reset()
    upstream.set_default(BEST, {"status": 503})
    began = time.time()
    served: list[str] = []
    while time.time() - began < seconds:
        served.append(ask(gateway, key, stream=len(served) % 2 == 1).model)
        time.sleep(trickle_s)
    return served, [r["t"] - began for r in upstream.requests(BEST)]


def requests_until_back(gateway: Gateway, upstream: FakeUpstream, trickle_s: float, limit: int) -> int:
    """The primary recovers: how many requests of the same traffic until it answers one."""
    key = gateway.create_key("free")
    upstream.set_default(BEST, None)
    for n in range(limit):
        if ask(gateway, key, stream=False).model == BEST:
            return n
        time.sleep(trickle_s)
    return limit


@pytest.mark.timeout(300)
def test_a_primary_down_for_over_a_minute_serves_again_promptly(module_gateway_factory: Callable[..., Gateway],
                                                                upstream: FakeUpstream) -> None:
    # The shipped breaker (its settings' defaults): opens after 3 failures for 5 s, doubling to at most 8 s.
    env = {k: v for k, v in FAST_ENV.items() if not k.startswith("FREEFERENCE_BREAKER_")}
    gateway = module_gateway_factory(workers=2, catalog=failover_catalog(upstream.url), **env)
    seconds, trickle_s = 65.0, 0.25
    served, hits = outage(gateway, upstream, seconds, trickle_s)
    assert set(served) == {BACKUP}  # every caller answered during the outage
    # Probed, not hammered: the first requests' attempts opened the breaker, then about one probe
    # per cooldown (at least 4 s, then at least 6.4 s).
    assert len(hits) <= 6 + seconds / 4, hits
    # ...and probing did not stall: a cooldown that kept doubling (5, 10, 20, 40 s) would have
    # probed once in the second half of the outage.
    assert len([t for t in hits if t > seconds / 2]) >= 3, hits
    # Back within a few cooldowns' worth of requests (at this pace, 8 s is about 30 requests; a
    # cooldown doubled past a minute would take hundreds).
    assert requests_until_back(gateway, upstream, trickle_s, limit=120) < 60


def test_a_longer_outage_keeps_probing_on_schedule_and_recovers_as_fast(module_gateway_factory: Callable[..., Gateway],
                                                                        upstream: FakeUpstream) -> None:
    # Scaled down: a 0.5 s cooldown capped at 2 s, an outage of 15 caps (a doubling cooldown would
    # have reached 64 s by its end).
    env = {**FAST_ENV, "FREEFERENCE_BREAKER_COOLDOWN_S": "0.5", "FREEFERENCE_BREAKER_MAX_COOLDOWN_S": "2"}
    gateway = module_gateway_factory(workers=2, catalog=failover_catalog(upstream.url), **env)
    seconds, trickle_s = 30.0, 0.1
    served, hits = outage(gateway, upstream, seconds, trickle_s)
    assert set(served) == {BACKUP}
    assert len(hits) <= 6 + seconds / 1.6, hits
    assert len([t for t in hits if t > seconds * 2 / 3]) >= 3, hits  # still probed late in the outage
    assert requests_until_back(gateway, upstream, trickle_s, limit=120) < 40
