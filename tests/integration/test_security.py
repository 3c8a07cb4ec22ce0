"""Authentication, tiers and secrecy of keys, against real API and worker processes."""

import hmac
from collections.abc import Iterator

import httpx
import pytest
from redis import Redis

from api.auth import is_master_key
from api.keys import hash_key, key_id_of
from settings import Settings
from tests.conftest import GatewayFactory
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

MASTER_KEY = "test-master-key-0123456789"
UPSTREAM_KEY = "sk-fake-a-0123456789"
MESSAGES = [{"role": "user", "content": "Say hello to the gateway."}]


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Iterator[Gateway]:
    # DEBUG logs: the secrecy test below greps the most talkative logs the processes can write.
    yield module_gateway_factory(workers=1, apis=1, FREEFERENCE_LOG_LEVEL="DEBUG")


def _chat(gateway: Gateway, headers: dict[str, str], **body: object) -> httpx.Response:
    return httpx.post(gateway.base_url + "/v1/chat/completions", headers=headers, timeout=15,
                      json={"messages": MESSAGES, "max_tokens": 2, **body})


def _revoked_key(gateway: Gateway) -> str:
    key = gateway.create_key("free")
    response = httpx.post(gateway.base_url + f"/admin/keys/{key_id_of(key)}/revoke",
                          headers={"Authorization": f"Bearer {MASTER_KEY}"})
    assert response.status_code == 200
    return key


@pytest.mark.parametrize("header", [
    None,
    "",
    "Bearer",
    "Basic dXNlcjpwYXNz",
    "Bearer ff-one ff-two",
    "Token ff-abc",
    "Bearer ff-not-a-real-key-but-well-formed-AAAAAAAAAAAAAAAAAAAAAAAAAA",
    "Bearer test-master-key-012345678",  # the master key minus its last character
    "revoked",
])
def test_bad_credentials_get_401(gateway: Gateway, header: str | None) -> None:
    if header == "revoked":
        header = f"Bearer {_revoked_key(gateway)}"
    headers = {} if header is None else {"Authorization": header}
    response = _chat(gateway, headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert set(error) == {"message", "type", "param", "code"}
    assert response.headers["www-authenticate"] == "Bearer"
    assert "server" not in response.headers  # the stack behind the gateway is nobody's business
    token = (header or "").partition(" ")[2]
    if len(token) > 8:
        assert token not in response.text  # never echo what was presented


def test_unknown_and_revoked_keys_are_indistinguishable(gateway: Gateway) -> None:
    unknown = _chat(gateway, {"Authorization": "Bearer ff-" + "B" * 43})
    revoked = _chat(gateway, {"Authorization": f"Bearer {_revoked_key(gateway)}"})
    assert unknown.json() == revoked.json()


def test_free_key_may_not_pin_a_model(gateway: Gateway, upstream: FakeUpstream) -> None:
    free = {"Authorization": f"Bearer {gateway.create_key('free')}"}
    pinned = _chat(gateway, free, model="general-best")
    assert pinned.status_code == 403
    assert pinned.json()["error"]["code"] == "tier_not_allowed"
    fallback = _chat(gateway, free, models=["coder"])
    assert fallback.status_code == 403 and fallback.json()["error"]["param"] == "models[0]"
    assert _chat(gateway, free, model="code").status_code == 200  # capability ids are fine
    pro = {"Authorization": f"Bearer {gateway.create_key('pro')}"}
    served = _chat(gateway, pro, model="coder")
    assert served.status_code == 200 and served.json()["model"] == "coder"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("GET", "/admin/usage"),
    ("GET", "/admin/keys/key_0000000000000000"),
    ("PATCH", "/admin/keys/key_0000000000000000"),
    ("POST", "/admin/keys/key_0000000000000000/revoke"),
    ("GET", "/admin/keys/key_0000000000000000/usage"),
])
def test_admin_needs_the_master_key(gateway: Gateway, method: str, path: str) -> None:
    url = gateway.base_url + path
    body = {"name": "x"} if path == "/admin/keys" else {}
    nobody = httpx.request(method, url, json=body)
    assert nobody.status_code == 401 and nobody.json()["error"]["code"] == "invalid_api_key"
    stranger = httpx.request(method, url, json=body, headers={"Authorization": "Bearer ff-nope"})
    assert stranger.status_code == 401
    user = httpx.request(method, url, json=body,
                         headers={"Authorization": f"Bearer {gateway.create_key('pro')}"})
    assert user.status_code == 403 and user.json()["error"]["code"] == "admin_only"
    master = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {MASTER_KEY}"})
    assert master.status_code in (200, 201, 404)  # 404: the made-up key id


def test_only_key_hashes_are_stored(gateway: Gateway) -> None:
    key = gateway.create_key("free")
    assert _chat(gateway, {"Authorization": f"Bearer {key}"}).status_code == 200
    stored = b""
    with Redis.from_url(gateway.redis_url) as redis:
        names = list(redis.scan_iter())
        for name in names:  # values as Redis hands them out (DUMP may compress them)
            kind = redis.type(name)
            if kind == b"string":
                stored += redis.get(name) or b""
            elif kind == b"hash":
                stored += b"".join(k + v for k, v in redis.hgetall(name).items())
            elif kind in (b"set", b"zset", b"list"):
                members = (redis.smembers(name) if kind == b"set" else redis.zrange(name, 0, -1)
                           if kind == b"zset" else redis.lrange(name, 0, -1))
                stored += b"".join(members)
    assert key.encode() not in b"".join(names) + stored
    assert any(hash_key(key).encode() in name for name in names)


def test_key_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # User keys are never compared: they are hashed and looked up (test_only_key_hashes_are_stored).
    # The master key is the one string comparison, and it goes through hmac.compare_digest.
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    settings = Settings(master_key=MASTER_KEY)
    assert is_master_key(settings, MASTER_KEY)
    assert not is_master_key(settings, MASTER_KEY[:-1] + "x")
    assert calls == [1, 1]


def test_no_key_reaches_logs_or_error_bodies(gateway: Gateway, upstream: FakeUpstream) -> None:
    """Runs last in this module: every key used above and here must be absent from every log."""
    keys = [gateway.create_key("free"), gateway.create_key("pro"), _revoked_key(gateway)]
    bodies: list[str] = []
    for key in keys:
        auth = {"Authorization": f"Bearer {key}"}
        bodies.append(_chat(gateway, auth).text)
        bodies.append(_chat(gateway, auth, model="general-best").text)
        bodies.append(_chat(gateway, auth, messages=[]).text)
        with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", headers=auth, timeout=15,
                          json={"messages": MESSAGES, "stream": True}) as streamed:
            bodies.append(streamed.read().decode())
    upstream.script("general-best", {"status": 401, "message": "bad key"}, *[{"status": 500}] * 4)
    bodies.append(_chat(gateway, {"Authorization": f"Bearer {keys[1]}"}, model="general-best").text)
    bodies.append(httpx.get(gateway.base_url + "/admin/keys", headers={"Authorization": f"Bearer {MASTER_KEY}"}).text)
    secrets = [*keys, MASTER_KEY, UPSTREAM_KEY, "ff-" + "B" * 43]
    logs = gateway.logs()
    assert "freeference" in logs  # the processes did log (DEBUG), so the check below means something
    for secret in secrets:
        assert secret not in logs
        assert all(secret not in body for body in bodies)
