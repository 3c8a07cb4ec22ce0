"""Hostile and careless input against the real gateway: each costs the gateway little and tells nothing.

One test (or a few) per way of abusing the gateway that docs/security.md lists: deep JSON, ids
that would name internal keys, prompt text in logs and headers, bogus keys with slow bodies,
huge or endless request heads, callers that hang up mid-body, chunked bodies over the limit,
and a Redis outage in the middle of streams.
"""

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.integration.test_failover_support import FAST_ENV, ask, failover_catalog, forget_health
from tests.support.processes import (
    FakeUpstream,
    Gateway,
    OwnRedis,
    base_env,
    batch_jsonl,
    catalog_yaml,
    metric_total,
    scrape,
    wait_batch,
    wait_for,
)

pytestmark = pytest.mark.integration

SENTINEL = "zqx7Sentinel81"  # stands for prompt text: it must never reach a log line or a header
BODY_LIMIT = 256 * 1024
UPLOAD_LIMIT = 1024 * 1024
TIMEOUT_S = 2  # body and head deadlines in this module


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Iterator[Gateway]:
    # DEBUG: the log checks below read the most talkative logs the processes can write.
    yield module_gateway_factory(
        workers=1, apis=1, FREEFERENCE_LOG_LEVEL="DEBUG", FREEFERENCE_MAX_BODY_BYTES=str(BODY_LIMIT),
        FREEFERENCE_BATCH_UPLOAD_MAX_BYTES=str(UPLOAD_LIMIT), FREEFERENCE_HTTP_BODY_TIMEOUT_S=str(TIMEOUT_S),
        FREEFERENCE_HTTP_HEADER_TIMEOUT_S=str(TIMEOUT_S))


@pytest.fixture(scope="module")
def key(gateway: Gateway) -> str:
    return gateway.create_key("pro")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _chat(gateway: Gateway, key: str, **body: object) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": f"Say hello to {SENTINEL}."}], "max_tokens": 3, **body}
    return httpx.post(gateway.base_url + "/v1/chat/completions", headers=_auth(key), json=payload, timeout=20)


def _nested(levels: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": SENTINEL}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def _connect(gateway: Gateway) -> socket.socket:
    port = int(gateway.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (raises on timeout)."""
    sock.settimeout(timeout_s)
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


def _head_of(gateway: Gateway, key: str | None, length: int, path: str = "/v1/chat/completions") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: gateway\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _still_serving(gateway: Gateway, key: str) -> None:
    response = _chat(gateway, key)
    assert response.status_code == 200, response.text


# --- Deep JSON


_DEEP_FIELDS = {
    "response_format": b'{"messages": [{"role": "user", "content": "hi"}], '
                       b'"response_format": {"type": "json_schema", "json_schema": %s}}',
    "tools": b'{"messages": [{"role": "user", "content": "hi"}], '
             b'"tools": [{"type": "function", "function": {"name": "f", "parameters": %s}}]}',
    "metadata": b'{"messages": [{"role": "user", "content": "hi"}], "metadata": %s}',
    "messages": b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "extra": %s}]}]}',
}


@pytest.mark.parametrize("field", sorted(_DEEP_FIELDS))
@pytest.mark.parametrize("levels", [65, 300, 5000])
def test_json_nested_past_the_limit_is_a_400_in_any_field(gateway: Gateway, key: str, field: str,
                                                          levels: int) -> None:
    # Written by hand, as an attacker would: the SDKs' own encoders give up long before 5,000 levels.
    nested = b'{"a": ' * (levels - 1) + b'{"leaf": "' + SENTINEL.encode() + b'"}' + b"}" * (levels - 1)
    response = httpx.post(gateway.base_url + "/v1/chat/completions", content=_DEEP_FIELDS[field] % nested,
                          headers={**_auth(key), "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request_error"
    assert "nested" in error["message"] or "depth" in error["message"]
    _still_serving(gateway, key)


def test_a_deep_batch_line_is_that_lines_error(gateway: Gateway, key: str) -> None:
    client = gateway.client(key)
    deep = orjson.dumps({"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": "hi"}], "metadata": _nested(80)}})
    upload = client.files.create(file=("in.jsonl", batch_jsonl(2) + deep + b"\n"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = wait_batch(client, batch.id, {"failed", "completed"}, timeout_s=20)
    assert batch.status == "failed"
    errors = batch.errors.data
    assert [(e.line, e.param) for e in errors] == [(3, "body")] and "64" in errors[0].message
    _still_serving(gateway, key)


# --- Ids from the path


@pytest.mark.parametrize(("method", "template"), [
    ("GET", "/v1/files/{}"), ("GET", "/v1/files/{}/content"), ("DELETE", "/v1/files/{}"),
    ("GET", "/v1/batches/{}"), ("POST", "/v1/batches/{}/cancel"),
])
def test_ids_that_would_name_internal_keys_are_plain_404s(gateway: Gateway, key: str, method: str,
                                                          template: str) -> None:
    client = gateway.client(key)
    real_file = client.files.create(file=("in.jsonl", batch_jsonl(1)), purpose="batch").id
    real_batch = client.batches.create(input_file_id=real_file, endpoint="/v1/chat/completions",
                                       completion_window="24h").id
    kind = "file" if "files" in template else "batch"
    for odd in (f"{real_file}:content", f"{real_batch}:lines", f"{real_batch}:pending", "batch_x:results",
                "file-" + "0" * 24 + ":content", "ff:apikeys", "*", "a" * 5000):
        response = httpx.request(method, gateway.base_url + template.format(odd), headers=_auth(key), timeout=10)
        assert response.status_code == 404, (odd, response.text)
        error = response.json()["error"]
        assert error["code"] == f"{kind}_not_found" and error["message"] == f"No such {kind}."
    assert client.files.retrieve(real_file).id == real_file  # the real ones are untouched


def test_another_tenants_object_answers_exactly_like_a_missing_one(gateway: Gateway, key: str) -> None:
    owner, stranger = gateway.client(key), gateway.create_key("pro")
    file_id = owner.files.create(file=("in.jsonl", batch_jsonl(1)), purpose="batch").id
    batch_id = owner.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                    completion_window="24h").id
    missing_batch = "batch_" + "0" * 24

    def ask(method: str, path: str) -> tuple[int, bytes, dict[str, str]]:
        response = httpx.request(method, gateway.base_url + path, headers=_auth(stranger), timeout=10)
        headers = {k: v for k, v in response.headers.items() if k not in ("date", "x-request-id")}
        return response.status_code, response.content, headers

    foreign = [ask("GET", f"/v1/batches/{batch_id}"), ask("POST", f"/v1/batches/{batch_id}/cancel")]
    missing = [ask("GET", f"/v1/batches/{missing_batch}"), ask("POST", f"/v1/batches/{missing_batch}/cancel")]
    for (status, body, headers), (m_status, m_body, m_headers) in zip(foreign, missing, strict=True):
        assert status == m_status == 404 and headers == m_headers
        assert body == m_body.replace(missing_batch.encode(), batch_id.encode())
    foreign_files = [ask("GET", f"/v1/files/{file_id}"), ask("GET", f"/v1/files/{file_id}/content"),
                     ask("DELETE", f"/v1/files/{file_id}")]
    owner.files.delete(file_id)
    gone_files = [ask("GET", f"/v1/files/{file_id}"), ask("GET", f"/v1/files/{file_id}/content"),
                  ask("DELETE", f"/v1/files/{file_id}")]
    assert foreign_files == gone_files and all(status == 404 for status, _, _ in gone_files)


# --- Prompt text stays out of logs and headers


def test_prompt_text_never_reaches_logs_or_headers(gateway: Gateway, key: str, upstream: FakeUpstream) -> None:
    """Sends the sentinel through every kind of answer, then greps every header and every log line."""
    said = f"Traceback (most recent call last): KeyError: '{SENTINEL}' in {SENTINEL}.py, line 3 — why?"
    messages = [{"role": "user", "content": said}]
    responses: list[httpx.Response] = []

    def post(**body: object) -> None:
        responses.append(httpx.post(gateway.base_url + "/v1/chat/completions", headers=_auth(key), timeout=20,
                                    json={"messages": messages, "max_tokens": 3, **body}))

    post()  # served
    post(stream=True)
    post(temperature=9)  # schema error
    post(model=SENTINEL)  # unknown model
    post(response_format=_nested(70))  # too deep
    post(messages=[{"role": SENTINEL, "content": said}])  # bad role
    # Upstream errors that quote the prompt back, as providers do.
    upstream.script("general-best", {"status": 400, "message": f"content_policy: {SENTINEL} is not allowed"})
    post(model="general-best")
    upstream.set_default("*", {"status": 500, "message": f"model crashed on '{SENTINEL}'"})
    post()  # every upstream fails: 502
    upstream.reset()
    upstream.script("general-best", {"cut_after": 2})
    upstream.set_default("general-backup", {"status": 500, "message": SENTINEL})
    post(stream=True, max_tokens=8, route={"intent": "general"})  # cut mid-stream, continuation fails
    upstream.reset()
    responses.append(httpx.post(gateway.base_url + "/v1/chat/completions", headers=_auth(key), timeout=20,
                                content=b'{"messages": [{"role": "user", "content": "' + SENTINEL.encode() + b'"'))
    assert {r.status_code for r in responses} >= {200, 400, 404, 502}
    for response in responses:
        assert all(SENTINEL.lower() not in f"{k}: {v}".lower() for k, v in response.headers.items()), response.headers
    intent_reason = responses[0].headers.get("x-freeference-intent-reason", "")
    assert "keyerror" not in intent_reason.lower() and ".py" not in intent_reason  # a rule, never the words
    logs = gateway.logs()
    assert "request_id" in logs  # the processes did log, so the check below means something
    assert SENTINEL not in logs


# --- Bogus keys, slow bodies, slow and huge heads


def test_a_bogus_key_is_refused_before_its_body_and_the_connection_closed(gateway: Gateway) -> None:
    with _connect(gateway) as sock:
        sock.sendall(_head_of(gateway, "ff-bogus-" + "A" * 40, BODY_LIMIT - 1))  # and then no body at all
        answer = _read_until_closed(sock, timeout_s=5)
    assert _status(answer) == 401 and b"connection: close" in answer.lower()
    assert b'"code":"invalid_api_key"' in answer


def test_a_thousand_slow_bogus_bodies_do_not_hurt_normal_traffic(gateway: Gateway, key: str) -> None:
    """A flood of bogus keys that send headers and then trickle their bodies (bench/hostile_flood.py measures it)."""
    sockets: list[socket.socket] = []
    answers: list[int] = []

    def trickle() -> None:
        for _ in range(1000):
            sock = _connect(gateway)
            sock.sendall(_head_of(gateway, "ff-bogus-" + "B" * 40, BODY_LIMIT - 1) + b"{")
            sockets.append(sock)

    flood = threading.Thread(target=trickle)
    flood.start()
    try:
        client = gateway.client(key, timeout=20)
        while flood.is_alive() or len(answers) < 20:
            reply = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2)
            answers.append(len(reply.choices))
        flood.join()
        assert answers.count(1) == len(answers) >= 20
        # Every bogus connection got its 401 and was closed, not left open for its body.
        for sock in sockets:
            answer = _read_until_closed(sock, timeout_s=10)
            assert _status(answer) == 401
    finally:
        for sock in sockets:
            sock.close()


def test_a_slow_body_with_a_valid_key_gets_408(gateway: Gateway, key: str) -> None:
    with _connect(gateway) as sock:
        sock.sendall(_head_of(gateway, key, 1000))
        answer = b""
        sock.settimeout(0.5)
        deadline = time.monotonic() + TIMEOUT_S + 8
        while not answer and time.monotonic() < deadline:
            try:
                sock.sendall(b" ")  # one byte every half second: far below any fair rate
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        answer += _read_until_closed(sock)
    assert _status(answer) == 408 and b'"code":"request_timeout"' in answer
    _still_serving(gateway, key)


@pytest.mark.parametrize(("extra", "reason"), [
    ({"X-Big": "a" * 40_000}, "bytes"),
    ({f"X-Many-{i}": "1" for i in range(150)}, "lines"),
])
def test_oversized_heads_are_431(gateway: Gateway, key: str, extra: dict[str, str], reason: str) -> None:
    response = httpx.get(gateway.base_url + "/v1/models", headers={**_auth(key), **extra}, timeout=10)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_fields_too_large"
    assert reason in response.json()["error"]["message"]


def test_a_flood_of_10mb_headers_does_not_grow_the_api(gateway: Gateway, key: str) -> None:
    pid = gateway.apis[0].pid
    before_kb = _rss_kb(pid)
    for _ in range(20):
        with _connect(gateway) as sock:
            with contextlib.suppress(OSError):  # the server stopped reading and closed: the point
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000_000 + b"\r\n\r\n")
            assert _status(_read_until_closed(sock)) in (431, 0)
    grown_mb = (_rss_kb(pid) - before_kb) / 1024
    assert grown_mb < 40, f"the API grew by {grown_mb:.0f} MB"  # about 216 MB before the bound
    _still_serving(gateway, key)


def test_slowloris_and_idle_connections_are_closed(gateway: Gateway, key: str) -> None:
    partial = [_connect(gateway) for _ in range(50)]
    idle = [_connect(gateway) for _ in range(50)]
    try:
        for sock in partial:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        for sock in partial:  # each keeps sending a byte now and then; its head never ends
            answer = _read_until_closed(sock, timeout_s=TIMEOUT_S + 8)
            assert _status(answer) == 408
        for sock in idle:
            assert _read_until_closed(sock, timeout_s=TIMEOUT_S + 8) == b""
        refused = metric_total(scrape(gateway), "freeference_request_heads_refused_total", reason="head_timeout")
        assert refused >= 50
    finally:
        for sock in partial + idle:
            sock.close()
    _still_serving(gateway, key)


# --- Callers that leave, bodies over the limit


def test_a_caller_that_hangs_up_mid_body_is_an_info_line_and_a_499(gateway: Gateway, key: str) -> None:
    def left() -> float:
        return metric_total(scrape(gateway), "freeference_requests_total", route="/v1/chat/completions",
                            status="499")

    before = left()
    for _ in range(3):
        with _connect(gateway) as sock:
            sock.sendall(_head_of(gateway, key, 5000) + b'{"messages": [')
            time.sleep(0.2)
    wait_for(lambda: left() >= before + 3, 10, "three requests counted as 499")
    api_log = "".join(p.read_text() for p in gateway.log_dir.glob("api-*.log"))
    assert "client went away before its request body was complete" in api_log
    assert "Traceback" not in api_log and '"level":"ERROR"' not in api_log


def test_a_chunked_upload_over_the_limit_is_413_as_soon_as_it_passes(gateway: Gateway, key: str) -> None:
    head = ("POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\n\r\n")
    part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n'
    chunk = b"a" * 16384
    for presented in (key, "ff-bogus-" + "C" * 40):
        sent = 0
        with _connect(gateway) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # what we sent ≈ what reached the server
            sock.sendall(head.format(presented).encode() + b"%x\r\n" % len(part) + part + b"\r\n")
            with contextlib.suppress(OSError):  # refused and closed mid-upload
                while sent < 20 * UPLOAD_LIMIT and not select.select([sock], [], [], 0)[0]:
                    sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    sent += len(chunk)
            answer = _read_until_closed(sock)
        if presented == key:
            assert _status(answer) == 413 and b'"code":"request_too_large"' in answer
            assert sent < 2 * UPLOAD_LIMIT  # answered once the limit was passed, not at the end of the upload
        else:
            assert _status(answer) == 401  # no key: not a byte of the body was wanted
            assert sent < UPLOAD_LIMIT


# --- Redis going away mid-stream


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis-data")
    yield server
    if server.process.poll() is None:
        server.stop()


def test_a_redis_outage_mid_stream_is_a_retryable_error_and_one_warning(own_redis: OwnRedis, upstream: FakeUpstream,
                                                                      tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(catalog_yaml(upstream.url))
    gateway = Gateway(redis_url=own_redis.url, env=base_env(own_redis.url, catalog), log_dir=tmp_path)
    try:
        gateway.start_worker()
        gateway.start_api()
        gateway.wait_ready(1)
        key = gateway.create_key("pro")
        upstream.set_default("*", {"token_interval_s": 0.2})
        endings: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", headers=_auth(key), timeout=60,
                              json={"messages": [{"role": "user", "content": "count"}], "stream": True,
                                    "max_tokens": 100}) as response:
                lines = [line for line in response.iter_lines() if line]
            endings.append(lines[-1])

        streams = [threading.Thread(target=stream) for _ in range(3)]
        for thread in streams:
            thread.start()
        time.sleep(1.5)
        own_redis.stop()
        time.sleep(4)
        own_redis.start()
        for thread in streams:
            thread.join(30)
        assert len(endings) == 3
        for ending in endings:  # in-band, retryable, never [DONE]: a truncated answer is never a success
            error = orjson.loads(ending.removeprefix("data: "))["error"]
            assert error["code"] == "service_unavailable" and error["type"] == "service_unavailable"
        upstream.reset()
        wait_for(lambda: httpx.get(gateway.base_url + "/readyz", timeout=2).status_code == 200, 20, "ready again")
        time.sleep(2)  # the worker's next heartbeats end its outage in the log
        for log_file in gateway.log_dir.glob("*.log"):
            text = log_file.read_text()
            assert "Traceback" not in text, log_file.name
            warnings = [line for line in text.splitlines() if '"level":"WARNING"' in line]
            assert len(warnings) <= 1, (log_file.name, warnings)  # one per process per outage
    finally:
        gateway.stop()


def test_the_openai_sdk_sees_the_edge_errors_as_typed_exceptions(gateway: Gateway) -> None:
    bogus = gateway.client("ff-bogus-" + "D" * 40)
    with pytest.raises(openai.AuthenticationError):
        bogus.models.list()
    big = gateway.client(gateway.create_key("free"))
    with pytest.raises(openai.APIStatusError) as info:
        big.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 1)}])
    assert info.value.status_code == 413


# --- A hostile upstream: huge bodies, JSON nested past what can be serialized again

HUGE = 300 * 1024 * 1024
# A worker at rest is well under 150 MB here; reading one 300 MB body whole took ~2 GB.
PEAK_BOUND_BYTES = 400 * 1024 * 1024


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def failover_gateway(module_gateway_factory: GatewayFactory, fake_upstream: FakeUpstream) -> Gateway:
    return module_gateway_factory(workers=1, catalog=failover_catalog(fake_upstream.url), **FAST_ENV)


@pytest.mark.parametrize(("fault", "attempts"), [
    ({"huge_body": HUGE, "status": 500}, "3"),  # a provider error: retried once, then the next model
    ({"huge_body": HUGE, "status": 200}, "2"),  # a whole JSON answer over the cap: a broken answer
    ({"huge_body": HUGE, "status": 200, "content_type": "text/event-stream"}, "2"),  # one endless SSE line
], ids=["error-500", "json-200", "sse-line"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_huge_upstream_body_fails_over_and_the_worker_stays_small(failover_gateway: Gateway, upstream: FakeUpstream,
                                                                    fault: dict, attempts: str, stream: bool) -> None:
    """The fake sends 300 MB without holding it; the worker reads up to its cap, hangs up and fails over."""
    forget_health(failover_gateway)  # each case starts with closed breakers
    upstream.script("general-best", fault, fault)
    answer = ask(failover_gateway, failover_gateway.create_key("free"), stream)
    assert answer.model == "general-backup"
    assert answer.headers["x-freeference-attempts"] == attempts
    sent = [r.get("bytes_sent", 0) for r in upstream.requests("general-best")]
    assert all(b < HUGE for b in sent)  # the worker hung up long before the end
    assert _peak_rss_bytes(failover_gateway.workers[0].pid) < PEAK_BOUND_BYTES


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_chunk_nested_too_deep_is_skipped(gateway: Gateway, key: str, upstream: FakeUpstream,
                                                      stream: bool) -> None:
    """Valid JSON 300 levels deep could not be serialized again on its way out: it is skipped as garbage."""
    upstream.script("general-best", {"deep_chunk_after": 2})
    response = _chat(gateway, key, stream=stream, max_tokens=5, route={"intent": "general"})
    assert response.status_code == 200
    if stream:
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        deltas = [c["delta"].get("content") or "" for e in events[:-1] for c in orjson.loads(e)["choices"]]
        content = "".join(deltas)
    else:
        content = response.json()["choices"][0]["message"]["content"]
    assert content == "[general-best] simulated reply: 1 2"
    worker_log = "".join(p.read_text() for p in gateway.log_dir.glob("worker-*.log"))
    assert "Traceback" not in worker_log and '"level":"ERROR"' not in worker_log
