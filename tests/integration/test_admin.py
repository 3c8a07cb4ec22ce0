"""/admin/keys, /admin/usage and `freeference keys …` against real processes."""

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory, run_cli
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

MASTER = {"Authorization": "Bearer test-master-key-0123456789"}
MESSAGES = [{"role": "user", "content": "Say hello to the gateway."}]


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Iterator[Gateway]:
    yield module_gateway_factory(workers=1, apis=1, FREEFERENCE_FREE_RPM="30")


def _admin(gateway: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, gateway.base_url + "/admin" + path, headers=MASTER, timeout=10, **kwargs)


def _chat(gateway: Gateway, key: str, **body: Any) -> httpx.Response:
    return httpx.post(gateway.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"messages": MESSAGES, "max_tokens": 3, **body}, timeout=20)


def test_key_lifecycle_over_http(gateway: Gateway) -> None:
    created = _admin(gateway, "POST", "/keys", json={"name": "team-a", "tier": "free", "tpm": 9000})
    assert created.status_code == 201
    record = created.json()
    key, key_id = record["key"], record["id"]
    assert key.startswith("ff-") and key_id.startswith("key_")
    assert record["effective_limits"] == {"rpm": 30, "tpm": 9000, "rpd": 1_000_000,  # tier rpm from settings
                                          "batch_lines": 1_000_000}
    assert _chat(gateway, key).status_code == 200

    listed = _admin(gateway, "GET", "/keys")
    assert key not in listed.text
    [mine] = [k for k in listed.json()["data"] if k["id"] == key_id]
    assert mine["name"] == "team-a" and mine["last_used"] is not None and not mine["revoked"]

    assert _chat(gateway, key, model="coder").status_code == 403
    patched = _admin(gateway, "PATCH", f"/keys/{key_id}", json={"tier": "pro", "rpm": 7})
    assert patched.status_code == 200
    assert patched.json()["tier"] == "pro" and patched.json()["effective_limits"]["rpm"] == 7
    assert patched.json()["limits"]["tpm"] == 9000  # untouched fields stay
    assert _chat(gateway, key, model="coder").status_code == 200  # pro may pin, from the next request

    reset = _admin(gateway, "PATCH", f"/keys/{key_id}", json={"tpm": None})
    assert reset.json()["limits"]["tpm"] is None and reset.json()["effective_limits"]["tpm"] == 100_000_000

    shown = _admin(gateway, "GET", f"/keys/{key_id}")
    assert shown.status_code == 200 and shown.json()["tier"] == "pro"
    assert _admin(gateway, "POST", f"/keys/{key_id}/revoke").json()["revoked"] is True
    assert _chat(gateway, key).status_code == 401
    assert _admin(gateway, "GET", f"/keys/{key_id}").json()["revoked"] is True


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/keys/key_ffffffffffffffff", None, 404),
    ("POST", "/keys/key_ffffffffffffffff/revoke", None, 404),
    ("PATCH", "/keys/key_ffffffffffffffff", {"rpm": 3}, 404),
    ("GET", "/keys/ff-a-plaintext-key-in-a-url", None, 400),
    ("POST", "/keys", {"name": "x", "tier": "gold"}, 400),
    ("POST", "/keys", {"name": "x", "rpm": 0}, 400),
    ("POST", "/keys", {"name": ""}, 400),
    ("PATCH", "/keys/key_ffffffffffffffff", {"colour": "red"}, 400),
    ("GET", "/usage?days=0", None, 400),
])
def test_admin_errors_are_openai_shaped(gateway: Gateway, method: str, path: str, body: Any, status: int) -> None:
    response = _admin(gateway, method, path, json=body)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_usage_per_day_and_model(gateway: Gateway, upstream: FakeUpstream) -> None:
    created = _admin(gateway, "POST", "/keys", json={"name": "metered", "tier": "pro"}).json()
    key, key_id = created["key"], created["id"]
    first = _chat(gateway, key).json()["usage"]
    second = _chat(gateway, key, max_tokens=5).json()["usage"]
    with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"messages": MESSAGES, "max_tokens": 4, "stream": True,
                            "stream_options": {"include_usage": True}}, timeout=20) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("data: {")]
    third = json.loads(lines[-1][6:])["usage"]
    upstream.script("coder", *[{"status": 500}] * 4)
    assert _chat(gateway, key, model="coder").status_code == 502  # counted as a failure, no tokens billed

    usage = _admin(gateway, "GET", f"/keys/{key_id}/usage", params={"days": 2}).json()
    [today] = usage["days"]
    served = today["models"]["general-best"]
    assert served == {
        "requests": 3, "failures": 0,
        "prompt_tokens": first["prompt_tokens"] + second["prompt_tokens"] + third["prompt_tokens"],
        "completion_tokens": first["completion_tokens"] + second["completion_tokens"] + third["completion_tokens"],
    }
    assert today["models"]["coder"] == {"requests": 1, "failures": 1, "prompt_tokens": 0, "completion_tokens": 0}
    assert usage["total"]["requests"] == 4 and usage["total"]["failures"] == 1

    everyone = _admin(gateway, "GET", "/usage").json()["data"]
    assert next(u for u in everyone if u["key_id"] == key_id)["total"] == usage["total"]


def test_cli_manages_keys_and_shows_usage(gateway: Gateway) -> None:
    env = gateway.env
    created = run_cli("keys", "create", "--name", "from-cli", "--tier", "pro", "--rpm", "5", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("ff-") and " " not in key
    assert _chat(gateway, key).status_code == 200

    listed = run_cli("keys", "list", env=env)
    assert key not in listed.stdout
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    [mine] = [r for r in records if r["name"] == "from-cli"]
    assert mine["effective_limits"]["rpm"] == 5 and mine["tier"] == "pro"

    usage = run_cli("keys", "usage", key, env=env)
    assert usage.returncode == 0, usage.stderr
    assert json.loads(usage.stdout)["total"]["requests"] == 1
    assert key not in usage.stdout

    updated = run_cli("keys", "update", mine["id"], "--rpm", "0", "--tier", "free", env=env)
    assert json.loads(updated.stdout)["effective_limits"]["rpm"] == 30 and "free" in updated.stdout

    revoked = run_cli("keys", "revoke", mine["id"], env=env)
    assert revoked.returncode == 0 and mine["id"] in revoked.stdout
    assert _chat(gateway, key).status_code == 401
    assert run_cli("keys", "revoke", "key_does_not_exist", env=env).returncode == 1


def test_usage_counts_a_request_the_caller_abandoned(gateway: Gateway, upstream: FakeUpstream) -> None:
    created = _admin(gateway, "POST", "/keys", json={"name": "quitter", "tier": "free"}).json()
    upstream.script("general-best", {"token_interval_s": 0.3})
    with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", timeout=20,
                      headers={"Authorization": f"Bearer {created['key']}"},
                      json={"messages": MESSAGES, "max_tokens": 40, "stream": True}) as streamed:
        assert streamed.status_code == 200
        next(line for line in streamed.iter_lines() if line.startswith("data: {"))
    # Left after the first chunk: the request is counted, under the model that was answering.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        usage = _admin(gateway, "GET", f"/keys/{created['id']}/usage").json()
        if usage["total"]["requests"]:
            break
        time.sleep(0.1)
    assert usage["days"][0]["models"] == {
        "general-best": {"requests": 1, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0}}
