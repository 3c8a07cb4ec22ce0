"""A flapping provider under a steady trickle, with two workers sharing the breaker state in Redis."""

import itertools
import time
from collections.abc import Callable

import pytest

from tests.integration.test_failover_support import FAST_ENV, ask, failover_catalog
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

BEST, BACKUP = "general-best", "general-backup"
OUTAGE_S = 6.0
TRICKLE_S = 0.1
MIN_REQUESTS = 25


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway], fake_upstream: FakeUpstream) -> Gateway:
    env = {**FAST_ENV, "FREEFERENCE_BREAKER_FAILURE_THRESHOLD": "2", "FREEFERENCE_BREAKER_COOLDOWN_S": "0.5",
           "FREEFERENCE_BREAKER_MAX_COOLDOWN_S": "2", "FREEFERENCE_RETRY_BACKOFF_S": "0.05"}
    return module_gateway_factory(workers=2, catalog=failover_catalog(fake_upstream.url), **env)


def test_outage_is_served_by_the_fallback_and_traffic_returns_after_recovery(gateway: Gateway,
                                                                             upstream: FakeUpstream) -> None:
    key = gateway.create_key("free")
    assert ask(gateway, key, stream=False).model == BEST
    upstream.reset()
    upstream.set_default(BEST, {"status": 503})
    outage_started = time.time()
    served_during_outage: list[str] = []
    # At least OUTAGE_S and MIN_REQUESTS, however slow the machine is today.
    while time.time() - outage_started < OUTAGE_S or len(served_during_outage) < MIN_REQUESTS:
        answer = ask(gateway, key, stream=len(served_during_outage) % 2 == 1)
        served_during_outage.append(answer.model)
        time.sleep(TRICKLE_S)
    outage_s = time.time() - outage_started
    # Every caller got an answer, from the fallback, while the primary was down.
    assert set(served_during_outage) == {BACKUP}
    hits = sorted(r["t"] for r in upstream.requests(BEST))
    # Probed, not hammered: without a breaker every request would try the primary twice.
    # The first request's two attempts opened it; then at most one probe per cooldown (>= 0.5 s,
    # then >= 1 s): never a probe per request.
    assert len(hits) <= 3 + outage_s, (len(hits), outage_s)
    assert len(hits) < len(served_during_outage) / 2
    # After the breaker opened, the primary saw single probes spaced by the (growing) cooldown.
    probes = hits[2:]
    assert probes, "the breaker never probed the primary"
    assert all(b - a >= 0.4 for a, b in itertools.pairwise(probes)), probes

    upstream.set_default(BEST, None)
    recovered_at = time.time()
    served_after: list[tuple[float, str]] = []
    while time.time() - recovered_at < 30:
        answer = ask(gateway, key, stream=False)
        served_after.append((time.time(), answer.model))
        if [m for _, m in served_after[-5:]] == [BEST] * 5:
            break
        time.sleep(TRICKLE_S)
    back = next(t for t, m in served_after if m == BEST)
    assert back - recovered_at < 30
    assert [m for _, m in served_after[-5:]] == [BEST] * 5  # and it stays there
