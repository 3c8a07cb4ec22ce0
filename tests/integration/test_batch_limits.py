"""Batch limits and expiry on a gateway with small limits: refused uploads, failed validation, `expired`."""

import collections
import io
import json

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory
from tests.support.processes import FakeUpstream, batch_jsonl, wait_batch

pytestmark = pytest.mark.integration


def test_limits_validation_and_expiry(gateway_factory: GatewayFactory, upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=1, FREEFERENCE_BATCH_UPLOAD_MAX_BYTES="20000",
                              FREEFERENCE_BATCH_MAX_LINES="50", FREEFERENCE_BATCH_WINDOW_S="3",
                              FREEFERENCE_BATCH_WORKER_CONCURRENCY="2",
                              FREEFERENCE_BATCH_STORAGE_MAX_BYTES_PER_KEY="100000")
    key = gateway.create_key("free")
    client = gateway.client(key)

    # Over the byte limit: refused at upload with an OpenAI error, nothing stored.
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 30_000)), purpose="batch")
    assert info.value.status_code == 413
    assert info.value.body["code"] in ("file_too_large", "request_too_large")
    assert list(client.files.list()) == []
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", io.BytesIO(batch_jsonl(1))), purpose="fine-tune")
    # Only /v1/chat/completions and /v1/embeddings lines can be batched.
    response = httpx.post(gateway.base_url + "/v1/batches", headers={"Authorization": f"Bearer {key}"},
                          json={"input_file_id": "file-x", "endpoint": "/v1/completions", "completion_window": "24h"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "endpoint"

    # Over the line limit, and bad lines: the batch fails validation; not one line runs.
    too_many = client.files.create(file=("many.jsonl", io.BytesIO(batch_jsonl(51))), purpose="batch")
    failed = client.batches.create(input_file_id=too_many.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    assert failed.status == "failed" and failed.failed_at
    assert [e.code for e in failed.errors.data] == ["too_many_requests"]
    bad = batch_jsonl(3) + b"{oops\n" + batch_jsonl(1)  # line 5 repeats req-0
    bad_file = client.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="batch")
    failed = client.batches.create(input_file_id=bad_file.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    assert failed.status == "failed"
    assert [(e.code, e.line) for e in failed.errors.data] == [("invalid_json_line", 4), ("duplicate_custom_id", 5)]
    assert failed.request_counts.total == 0 and failed.output_file_id is None
    assert upstream.requests() == []

    # A batch that cannot finish inside its window ends `expired`; unrun lines are in the error file.
    upstream.set_default("*", {"delay_s": 0.5})
    slow = client.files.create(file=("slow.jsonl", io.BytesIO(batch_jsonl(40))), purpose="batch")
    batch = client.batches.create(input_file_id=slow.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.expires_at is not None and batch.expires_at - batch.created_at == 3
    done = wait_batch(client, batch.id, {"expired", "completed"}, timeout_s=30)
    assert done.status == "expired" and done.expired_at
    output = ([json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
              if done.output_file_id else [])
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    seen = collections.Counter(line["custom_id"] for line in output + errors)
    assert seen == collections.Counter(f"req-{i}" for i in range(40))
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert done.request_counts.completed == len(output) < 40
    assert done.request_counts.failed == len(errors)

    # The key's storage quota (100 kB here) covers uploads and results: past it uploads are
    # refused until the key deletes what it has collected.
    uploads = []
    with pytest.raises(openai.BadRequestError) as refused:
        for _ in range(10):
            uploads.append(client.files.create(file=("f.jsonl", io.BytesIO(b"x" * 15_000)), purpose="batch"))
    assert refused.value.body["code"] == "storage_limit_exceeded"
    assert 1 <= len(uploads) < 7
    client.files.delete(uploads[0].id)
    assert client.files.create(file=("f.jsonl", io.BytesIO(b"x" * 15_000)), purpose="batch").bytes == 15_000
