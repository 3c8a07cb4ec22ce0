"""/metrics and the JSON logs, through real processes: what a scrape shows after real traffic."""

import json
import time

import httpx
import pytest

from bench.fake_upstream import reply_tokens
from tests.support.processes import FakeUpstream, Gateway, StreamProbe, scrape, wait_for
from tests.support.processes import metric_total as total

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def key(shared_gateway: Gateway) -> str:
    return shared_gateway.create_key("free")


def test_requests_latencies_and_attempts_are_counted(shared_gateway: Gateway, upstream: FakeUpstream,
                                                     key: str) -> None:
    before = scrape(shared_gateway)
    client = shared_gateway.client(key)
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, max_tokens=3)
    intent = raw.headers["x-freeference-intent"]
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=3, stream=True)
              if c.choices]
    assert "".join(pieces) == "".join(reply_tokens("general-best", 3))
    after = scrape(shared_gateway)

    route = "/v1/chat/completions"
    ok = {"route": route, "status": "200", "model": "general-best", "provider": "fake-a", "intent": intent}
    assert total(after, "freeference_requests_total", **ok) - total(before, "freeference_requests_total", **ok) == 2
    for name, labels in [("freeference_request_duration_seconds_count", {"route": route, "stream": "false"}),
                         ("freeference_request_duration_seconds_count", {"route": route, "stream": "true"}),
                         ("freeference_time_to_first_token_seconds_count", {}),
                         ("freeference_gateway_overhead_seconds_count", {"kind": "complete"}),
                         ("freeference_gateway_overhead_seconds_count", {"kind": "first_token"})]:
        assert total(after, name, **labels) - total(before, name, **labels) == 1, (name, labels)
    waits = "freeference_queue_wait_seconds_count"
    assert total(after, waits) - total(before, waits) == 2
    ok_attempts = {"provider": "fake-a", "outcome": "ok"}
    assert (total(after, "freeference_upstream_attempts_total", **ok_attempts)
            - total(before, "freeference_upstream_attempts_total", **ok_attempts)) == 2
    # The gateway's own share is a small part of the whole request.
    overhead = total(after, "freeference_gateway_overhead_seconds_sum") - total(before,
                                                                              "freeference_gateway_overhead_seconds_sum")
    assert 0 <= overhead < 2.0


def test_failed_attempts_are_counted_by_reason(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    upstream.set_default("general-best", {"status": 503})
    before = scrape(shared_gateway)
    raw = shared_gateway.client(key).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES,
                                                                              max_tokens=3)
    served = raw.headers["x-freeference-provider"]
    after = scrape(shared_gateway)
    failed = {"provider": "fake-a", "outcome": "server_error"}
    assert total(after, "freeference_upstream_attempts_total", **failed) > total(
        before, "freeference_upstream_attempts_total", **failed)
    served_ok = {"provider": served, "outcome": "ok"}
    assert total(after, "freeference_upstream_attempts_total", **served_ok) - total(
        before, "freeference_upstream_attempts_total", **served_ok) == 1


def test_cluster_state_and_inflight_streams(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    upstream.set_default("general-best", {"token_interval_s": 0.2})
    probe = StreamProbe(shared_gateway.client(key, timeout=30), max_tokens=20).start()
    wait_for(lambda: probe.first_at is not None, 15, "first token")
    during = scrape(shared_gateway)
    assert total(during, "freeference_inflight_streams") >= 1
    assert total(during, "freeference_inflight_jobs") >= 1
    assert total(during, "freeference_redis_up") == 1
    assert total(during, "freeference_workers_alive") == 2
    assert total(during, "freeference_queue_depth") == 0  # running jobs leave the queue
    probe.join(30)
    assert probe.error is None
    after = scrape(shared_gateway)
    assert total(after, "freeference_inflight_streams") == 0
    exposition = httpx.get(shared_gateway.base_url + "/metrics", timeout=5)
    assert exposition.headers["content-type"].startswith("text/plain")
    # Every deployment the workers publish is in exactly one breaker state.
    states: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name == "freeference_breaker_state":
            deployment = dict(labels)["deployment"]
            states[deployment] = states.get(deployment, 0) + value
    assert all(v == 1 for v in states.values()), states


def test_logs_are_json_with_the_request_id_and_no_key(shared_gateway: Gateway, upstream: FakeUpstream,
                                                      key: str) -> None:
    upstream.set_default("general-best", {"status": 500, "message": "boom"})
    request_id = f"req-logtest-{time.monotonic_ns()}"
    response = httpx.post(shared_gateway.base_url + "/v1/chat/completions", timeout=15,
                          headers={"Authorization": f"Bearer {key}", "x-request-id": request_id},
                          json={"messages": MESSAGES, "max_tokens": 3})
    assert response.status_code == 200
    time.sleep(0.5)  # let the worker flush its line
    logs = shared_gateway.logs()
    records = []
    for line in logs.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))  # every structured line is a whole JSON object
    tagged = [r for r in records if r.get("request_id") == request_id]
    assert tagged, "no log line names the request"
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert key not in logs
    assert "Say hello" not in logs


def test_job_errors_are_counted_by_code(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    for model in ("general-best", "general-backup", "coder", "reasoner"):
        upstream.set_default(model, {"status": 500})
    before = scrape(shared_gateway)
    response = httpx.post(shared_gateway.base_url + "/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {key}"}, json={"messages": MESSAGES, "max_tokens": 3})
    assert response.status_code == 502
    after = scrape(shared_gateway)
    failed = {"status": "502", "code": "upstream_failed"}
    assert total(after, "freeference_job_errors_total", **failed) - total(
        before, "freeference_job_errors_total", **failed) == 1
    answered = {"route": "/v1/chat/completions", "status": "502"}
    assert total(after, "freeference_requests_total", **answered) - total(
        before, "freeference_requests_total", **answered) == 1


def test_log_lines_mask_keys_and_carry_the_request_id() -> None:
    import logging

    from cli.logging_setup import JsonFormatter
    from workers.protocol import REQUEST_ID

    token = REQUEST_ID.set("req-unit-1")
    try:
        record = logging.LogRecord("freeference.test", logging.WARNING, __file__, 1,
                                   "upstream said: Authorization: Bearer sk-live-0123456789abcdef for ff-%s",
                                   ("abcdefghijklmnop1234",), None)
        line = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    assert line["request_id"] == "req-unit-1"
    assert line["level"] == "WARNING" and line["logger"] == "freeference.test"
    assert "sk-live" not in line["msg"] and "abcdefghijklmnop1234" not in line["msg"]
    assert line["msg"].count("[redacted]") == 2
