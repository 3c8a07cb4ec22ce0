"""CORS: off by default; for configured origins a browser's preflight is answered and answers are readable."""

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.support.processes import FakeUpstream

pytestmark = pytest.mark.integration

ORIGIN = "https://chat.example.test"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


def test_preflight_and_request_from_a_configured_origin(gateway_factory: GatewayFactory,
                                                        upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=1, FREEFERENCE_CORS_ORIGINS=f"{ORIGIN}, https://other.example.test")
    url = gateway.base_url + "/v1/chat/completions"
    # The browser's preflight carries no key: it is answered before the key check.
    preflight = httpx.options(url, headers=PREFLIGHT, timeout=5)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert preflight.headers["access-control-allow-credentials"] == "true"
    allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-stainless-os"} <= allowed
    assert "POST" in preflight.headers["access-control-allow-methods"]

    key = gateway.create_key("free")
    answer = httpx.post(url, headers={"Origin": ORIGIN, "Authorization": f"Bearer {key}"}, timeout=10,
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    exposed = answer.headers["access-control-expose-headers"].lower()
    assert "x-freeference-model" in exposed and "x-ratelimit-remaining-requests" in exposed
    # Errors are readable by the page too (a browser shows nothing of an answer without the header).
    refused = httpx.post(url, headers={"Origin": ORIGIN, "Authorization": "Bearer ff-wrong"}, json={}, timeout=5)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN

    stranger = httpx.options(url, headers={**PREFLIGHT, "Origin": "https://evil.example.test"}, timeout=5)
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers


def test_cors_is_off_by_default(gateway_factory: GatewayFactory, upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=1)
    preflight = httpx.options(gateway.base_url + "/v1/chat/completions", headers=PREFLIGHT, timeout=5)
    assert "access-control-allow-origin" not in preflight.headers
