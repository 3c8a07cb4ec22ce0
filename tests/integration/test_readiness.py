"""/readyz says why it is not ready when nothing can be served; /healthz stays liveness only."""

from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.support.processes import FakeUpstream, Gateway, catalog_yaml, wait_for

pytestmark = pytest.mark.integration


def _ready(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    response = httpx.get(gateway.base_url + "/readyz", timeout=5)
    return response.status_code, response.json()


def _settled(gateway: Gateway, workers: int) -> tuple[int, dict[str, Any]]:
    """/readyz once the workers heart-beat (before that, 'no worker' is the right answer)."""
    seen: list[tuple[int, dict[str, Any]]] = []

    def workers_seen() -> bool:
        seen.append(_ready(gateway))
        return seen[-1][1].get("workers", 0) >= workers

    wait_for(workers_seen, 20, "the workers' heartbeats")
    return seen[-1]


def test_no_enabled_provider_is_not_ready(gateway_factory: GatewayFactory, upstream: FakeUpstream) -> None:
    # The only provider needs a key the workers do not have: it is skipped, nothing is routable.
    providers = [{"id": "keyed", "base_url": upstream.url, "api_keys_env": ["NOT_SET_ANYWHERE_KEY"]}]
    models = [{"id": "m", "provider": "keyed", "upstream_name": "m", "context_window": 8192,
               "capabilities": ["chat"], "scores": {"general": 0.9, "code": 0.9, "reasoning": 0.9}}]
    gateway = gateway_factory(workers=1, catalog=catalog_yaml(upstream.url, models, providers), wait=False)
    status, body = _settled(gateway, workers=1)
    assert status == 503 and body["status"] == "unavailable"
    assert body["deployments"] == 0 and "no provider is enabled" in body["reason"]
    assert httpx.get(gateway.base_url + "/healthz", timeout=5).status_code == 200  # alive all the same


def test_ready_until_every_model_left_its_providers_listing(gateway_factory: GatewayFactory,
                                                            upstream: FakeUpstream) -> None:
    providers = [{"id": "fake-b", "base_url": upstream.url, "requires_key": False, "refresh_models_s": 0.3}]
    models = [{"id": "only", "provider": "fake-b", "upstream_name": "only", "context_window": 8192,
               "capabilities": ["chat"], "scores": {"general": 0.9, "code": 0.9, "reasoning": 0.9}}]
    gateway = gateway_factory(workers=1, catalog=catalog_yaml(upstream.url, models, providers))
    status, body = _ready(gateway)
    assert (status, body["status"], body["deployments"]) == (200, "ready", 1) and "reason" not in body
    try:
        upstream.set_models(["something-else"])  # the provider retired our only model
        wait_for(lambda: _ready(gateway)[0] == 503, 15, "/readyz to notice")
        assert "no deployment is routable" in _ready(gateway)[1]["reason"]
        upstream.set_models(["only"])
        wait_for(lambda: _ready(gateway)[0] == 200, 15, "/readyz to recover")
    finally:
        upstream.set_models(None)  # gateways of later modules share this fake and its listing
