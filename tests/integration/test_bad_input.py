"""Bad input and bad credentials get OpenAI-format errors, and the service stays up."""

import httpx
import pytest

from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

GOOD = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def key(shared_gateway: Gateway) -> str:
    return shared_gateway.create_key("free")


def _post(gateway: Gateway, key: str | None, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        all_headers["Authorization"] = f"Bearer {key}"
    return httpx.post(gateway.base_url + "/v1/chat/completions", content=content, headers=all_headers, timeout=30)


def _assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(("content", "param"), [
    (b'{"messages": [', None),
    (b"[1, 2, 3]", None),
    (b"", None),
    (b'{"messages": "hello"}', "messages"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    (b'{"messages": [{"role": "user", "content": "x"}], "route": {"frobnicate": true}}', "route.frobnicate"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', None),
])
def test_bad_bodies_are_400(shared_gateway: Gateway, upstream: FakeUpstream, key: str, content: bytes,
                            param: str | None) -> None:
    error = _assert_openai_error(_post(shared_gateway, key, content), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert upstream.requests() == []


def test_ten_megabyte_body_is_413(shared_gateway: Gateway, key: str) -> None:
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (10 * 1024 * 1024) + b'"}]}'
    _assert_openai_error(_post(shared_gateway, key, huge), 413, "request_too_large")


def test_chunked_body_over_limit_is_413(shared_gateway: Gateway, key: str) -> None:
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"a" * (1024 * 1024)
        yield b'"}]}'

    response = httpx.post(shared_gateway.base_url + "/v1/chat/completions", content=chunks(),
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}, timeout=30)
    _assert_openai_error(response, 413, "request_too_large")


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer ff-unknown-key", "Bearer a b"])
def test_bad_credentials_are_401(shared_gateway: Gateway, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = _post(shared_gateway, None, b'{"messages": [{"role": "user", "content": "x"}]}', headers)
    error = _assert_openai_error(response, 401, "invalid_api_key")
    assert "ff-unknown-key" not in error["message"]


def test_unknown_model_is_404_and_free_pin_is_403(shared_gateway: Gateway, key: str) -> None:
    _assert_openai_error(_post(shared_gateway, key, b'{"model": "no-such-model", "messages": [{"role": "user", '
                                                     b'"content": "x"}]}'), 404, "model_not_found")
    # A client's own default model name (gpt-…) is an alias: routed by intent, not refused.
    aliased = _post(shared_gateway, key, b'{"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}')
    assert aliased.status_code == 200 and aliased.json()["model"] == "general-best"
    _assert_openai_error(_post(shared_gateway, key, b'{"model": "coder", "messages": [{"role": "user", '
                                                     b'"content": "x"}]}'), 403, "tier_not_allowed")


def test_unknown_route_is_openai_404(shared_gateway: Gateway, key: str) -> None:
    # Without a key, /v1 tells an anonymous caller nothing, not even which paths exist.
    _assert_openai_error(httpx.get(shared_gateway.base_url + "/v1/nope", timeout=5), 401)
    _assert_openai_error(httpx.get(shared_gateway.base_url + "/v1/nope", headers={"Authorization": f"Bearer {key}"},
                                   timeout=5), 404)


def test_service_stays_up_after_bad_input(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    for content in (b"\xff\xfe\x00", b"{" * 10000, b'{"messages": [{"role": "user", "content": null}]}'):
        assert _post(shared_gateway, key, content).status_code < 500
    response = httpx.post(shared_gateway.base_url + "/v1/chat/completions", json=GOOD,
                          headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert response.status_code == 200
    assert httpx.get(shared_gateway.base_url + "/healthz", timeout=5).status_code == 200


def test_no_worker_is_503(gateway_factory, upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=0, FREEFERENCE_PICKUP_TIMEOUT_S="1")
    key = gateway.create_key("free")
    response = httpx.post(gateway.base_url + "/v1/chat/completions", json=GOOD,
                          headers={"Authorization": f"Bearer {key}"}, timeout=10)
    _assert_openai_error(response, 503, "no_workers")
    assert response.headers["retry-after"]
    assert httpx.get(gateway.base_url + "/readyz", timeout=5).status_code == 503
