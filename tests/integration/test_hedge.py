"""Hedged first token, end to end: a primary whose first token is far later than its history.

The first-token timeout is a minute here, so without a hedge the caller would wait for the
primary; with it the fallback answers, the primary's request is cancelled (the fake sees its
caller leave), nothing of it reaches the caller, and /metrics counts the hedge. How soon the
fallback's first token comes is measured in bench/hedge_ttft.py, not asserted here.
"""

from collections.abc import Callable

import pytest
import yaml

from bench.fake_upstream import reply_tokens
from tests.integration.test_failover_support import FAST_ENV, ask, forget_health
from tests.support.processes import FakeUpstream, Gateway, metric_total, scrape

pytestmark = pytest.mark.integration


def hedge_catalog(upstream_url: str) -> str:
    """primary (fake-a) > backup (fake-b) for every intent; first tokens may take a minute."""
    timeout = {"connect_s": 2, "first_token_s": 60, "idle_s": 60, "total_s": 120}
    providers = [{"id": "fake-a", "base_url": upstream_url, "api_keys_env": ["FAKE_A_KEY"], "timeout": timeout,
                  "refresh_models_s": 0},
                 {"id": "fake-b", "base_url": upstream_url, "requires_key": False, "timeout": timeout,
                  "refresh_models_s": 0}]
    scores = {"general": 0.9, "code": 0.9, "reasoning": 0.9}
    models = [{"id": "primary", "provider": "fake-a", "upstream_name": "primary", "context_window": 32768,
               "scores": scores},
              {"id": "backup", "provider": "fake-b", "upstream_name": "backup", "context_window": 32768,
               "scores": {k: v - 0.2 for k, v in scores.items()}}]
    return yaml.safe_dump({"providers": providers, "models": models, "capabilities": {
        "text-basic": {"name": "General Chat Model", "intent": "general"}}}, sort_keys=False)


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway], fake_upstream: FakeUpstream) -> Gateway:
    # Every slow first token may be hedged here: the share per minute is a unit test's business
    # (tests/unit/test_hedge.py), and this module's requests would otherwise use up one worker's.
    env = {**FAST_ENV, "FREEFERENCE_HEDGE_MIN_S": "0.5", "FREEFERENCE_HEDGE_MAX_S": "3",
           "FREEFERENCE_HEDGE_MAX_SHARE": "1"}
    return module_gateway_factory(workers=2, catalog=hedge_catalog(fake_upstream.url), **env)


@pytest.mark.parametrize("stream", [True, False])
def test_a_first_token_far_slower_than_its_history_is_served_by_the_fallback(gateway: Gateway,
                                                                             upstream: FakeUpstream,
                                                                             stream: bool) -> None:
    forget_health(gateway)
    key = gateway.create_key("free")
    for _ in range(5):  # a history of quick first tokens, shared by both workers
        assert ask(gateway, key, stream).model == "primary"
    before = metric_total(scrape(gateway), "freeference_hedges_total", provider="fake-a", outcome="won")
    upstream.script("primary", {"first_token_delay_s": 30})
    answer = ask(gateway, key, stream, max_tokens=6)
    assert answer.model == "backup"
    assert answer.content == "".join(reply_tokens("backup", 6))  # the backup's answer, nothing of the primary's
    assert answer.headers["x-freeference-route"] == "fake-a/primary=hedge"
    assert answer.headers["x-freeference-attempts"] == "1"  # slow is not failed
    slow = upstream.requests("primary")[-1]
    assert slow["outcome"] == "client_disconnected"  # cancelled, not left running upstream
    after = metric_total(scrape(gateway), "freeference_hedges_total", provider="fake-a", outcome="won")
    assert after == before + 1
    # A slow first token is no failure: the primary still serves the next request.
    assert ask(gateway, key, stream).model == "primary"
