"""The Batch API end to end, driven by the official openai SDK: files, batches, results, cancel, isolation."""

import io
import json
import time
from typing import Any

import openai
import pytest

from bench.fake_upstream import reply_tokens
from tests.support.processes import FakeUpstream, Gateway, batch_jsonl, wait_batch

pytestmark = pytest.mark.integration


def _upload(client: openai.OpenAI, content: bytes, name: str = "input.jsonl") -> Any:
    return client.files.create(file=(name, io.BytesIO(content)), purpose="batch")


def _running(client: openai.OpenAI, lines: int) -> Any:
    """Upload `lines` requests, create their batch and wait until it runs."""
    uploaded = _upload(client, batch_jsonl(lines))
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    return wait_batch(client, batch.id, {"in_progress", "completed"}, timeout_s=10)


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def test_sdk_drives_the_whole_flow(shared_gateway: Gateway, upstream: FakeUpstream) -> None:
    key = shared_gateway.create_key("pro")
    client = shared_gateway.client(key)
    # Lines pinned to "reasoner" are refused by the provider (a 400 is never failed over).
    upstream.set_default("reasoner", {"content_policy": True})
    good = batch_jsonl(20, prefix="ok", max_tokens=4)
    bad = batch_jsonl(3, prefix="refused", model="reasoner")
    uploaded = _upload(client, good + bad)
    assert uploaded.purpose == "batch" and uploaded.bytes == len(good + bad)
    assert client.files.retrieve(uploaded.id).filename == "input.jsonl"
    assert uploaded.id in [f.id for f in client.files.list()]

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert batch.status in ("validating", "in_progress", "finalizing", "completed")
    assert batch.metadata == {"job": "nightly"}
    done = wait_batch(client, batch.id, {"completed", "failed"}, timeout_s=60)

    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (23, 20, 3)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    # Token usage is summed over the completed lines (the fake answers 4 tokens each).
    assert done.usage is not None and done.usage.output_tokens == 20 * 4
    assert done.usage.input_tokens > 0 and done.usage.total_tokens == done.usage.input_tokens + 80
    output = _lines(client, done.output_file_id)
    errors = _lines(client, done.error_file_id)
    assert [line["custom_id"] for line in output] == [f"ok-{i}" for i in range(20)]
    for line in output:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["id"].startswith("batch_req_") and line["response"]["request_id"]
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "".join(reply_tokens("general-best", 4))
    assert sorted(line["custom_id"] for line in errors) == [f"refused-{i}" for i in range(3)]
    for line in errors:
        assert line["response"]["status_code"] == 400
        assert line["response"]["body"]["error"]["code"] == "content_policy_violation"
    # Every line went through routing exactly once: 20 to the general model, 3 to the pinned one.
    assert len(upstream.requests("general-best")) == 20
    assert len(upstream.requests("reasoner")) == 3

    assert batch.id in [b.id for b in client.batches.list()]
    output_file = client.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output"
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    # The finished batch keeps its results after its input file is gone.
    assert len(_lines(client, done.output_file_id)) == 20


def test_cancel_mid_batch(shared_gateway: Gateway, upstream: FakeUpstream) -> None:
    client = shared_gateway.client(shared_gateway.create_key("free"))
    upstream.set_default("general-best", {"delay_s": 0.3})
    batch = _running(client, 400)
    while (client.batches.retrieve(batch.id).request_counts.completed or 0) < 5:
        time.sleep(0.05)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert cancelled.cancelling_at
    final = wait_batch(client, batch.id, {"cancelled"}, timeout_s=30)

    output = _lines(client, final.output_file_id)
    errors = _lines(client, final.error_file_id)
    ids = [line["custom_id"] for line in output + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(400))  # each exactly once
    assert 5 <= len(output) < 400
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert final.request_counts.completed == len(output)
    assert final.request_counts.failed == len(errors)
    # Cancelling stopped the work: far fewer upstream calls than lines.
    assert len(upstream.requests()) < 400
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(wait_batch(client, _running(client, 1).id, {"completed"}, 30).id)


def test_owner_isolation(shared_gateway: Gateway, upstream: FakeUpstream) -> None:
    alice = shared_gateway.client(shared_gateway.create_key("free", name="alice"))
    bob = shared_gateway.client(shared_gateway.create_key("free", name="bob"))
    uploaded = _upload(alice, batch_jsonl(2))
    batch_id = _running(alice, 1).id
    for attempt in (lambda: bob.files.retrieve(uploaded.id), lambda: bob.files.content(uploaded.id),
                    lambda: bob.files.delete(uploaded.id), lambda: bob.batches.retrieve(batch_id),
                    lambda: bob.batches.cancel(batch_id),
                    lambda: bob.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                               completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert [f.id for f in bob.files.list()] == []
    assert [b.id for b in bob.batches.list()] == []
    assert alice.files.retrieve(uploaded.id).id == uploaded.id


def test_live_requests_do_not_wait_behind_a_big_batch(shared_gateway: Gateway, upstream: FakeUpstream) -> None:
    client = shared_gateway.client(shared_gateway.create_key("free"))
    upstream.set_default("*", {"delay_s": 0.2})
    batch = _running(client, 2000)
    try:
        for _ in range(5):
            started = time.monotonic()
            reply = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3)
            # Thousands of lines are still queued, yet a live request is served at once (generous
            # bound for a noisy machine; the upstream itself takes 0.2 s).
            assert time.monotonic() - started < 5
            assert reply.choices[0].message.content == "".join(reply_tokens("general-best", 3))
        assert client.batches.retrieve(batch.id).status == "in_progress"
    finally:
        client.batches.cancel(batch.id)
    wait_batch(client, batch.id, {"cancelled"}, timeout_s=30)
