"""Batches survive a SIGKILLed worker and a restarted API: every line recorded exactly once."""

import collections
import io
import json
import signal
import time

import openai
import pytest

from tests.conftest import GatewayFactory
from tests.support.processes import FakeUpstream, batch_jsonl, wait_batch

pytestmark = pytest.mark.integration

LINES = 300


def test_worker_sigkill_and_api_restart_mid_batch(gateway_factory: GatewayFactory, upstream: FakeUpstream) -> None:
    # 2 workers × 8 lines in flight against a 0.2 s upstream: the batch takes several seconds.
    gateway = gateway_factory(workers=2, FREEFERENCE_BATCH_WORKER_CONCURRENCY="8")
    upstream.set_default("*", {"delay_s": 0.2})
    client = gateway.client(gateway.create_key("free"))
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(batch_jsonl(LINES))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 30
    while (client.batches.retrieve(batch.id).request_counts.completed or 0) < 30:
        assert time.monotonic() < deadline, "the batch never got going"
        time.sleep(0.05)

    victim = gateway.workers[0]
    victim.send_signal(signal.SIGKILL)  # mid-call: it holds leased lines whose results never arrive
    victim.wait(timeout=10)
    gateway.apis[0].send_signal(signal.SIGKILL)
    gateway.apis[0].wait(timeout=10)
    gateway.start_api()
    client = gateway.client(client.api_key, replica=1)

    done = wait_batch(client, batch.id, {"completed", "failed"}, timeout_s=60)
    assert done.status == "completed", done
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = ([json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
              if done.error_file_id else [])
    seen = collections.Counter(line["custom_id"] for line in output + errors)
    assert seen == collections.Counter(f"req-{i}" for i in range(LINES)), "a line was lost or duplicated"
    assert errors == [] and all(line["response"]["status_code"] == 200 for line in output)
    assert (done.request_counts.completed, done.request_counts.failed) == (LINES, 0)
    # The killed worker's in-flight lines ran again elsewhere (at least once each).
    assert len(upstream.requests()) >= LINES


def test_failing_line_is_retried_then_recorded_once(gateway_factory: GatewayFactory, upstream: FakeUpstream) -> None:
    # Breakers never open here, so every attempt of a line costs the same upstream calls as a
    # live request does.
    gateway = gateway_factory(workers=1, FREEFERENCE_BREAKER_FAILURE_THRESHOLD="1000",
                              FREEFERENCE_BATCH_LINE_MAX_ATTEMPTS="3")
    client = gateway.client(gateway.create_key("free"))
    upstream.set_default("*", {"status": 500})
    with pytest.raises(openai.APIStatusError) as live:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert live.value.status_code == 502
    per_attempt = len(upstream.requests())
    assert per_attempt >= 1

    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(batch_jsonl(1))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_batch(client, batch.id, {"completed"}, timeout_s=60)
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 1)
    [line] = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert line["custom_id"] == "req-0" and line["response"]["status_code"] == 502
    assert line["response"]["body"]["error"]["code"] == "upstream_failed"
    # Three attempts of the line, each as many calls as the live request made.
    assert len(upstream.requests()) == per_attempt * 4
