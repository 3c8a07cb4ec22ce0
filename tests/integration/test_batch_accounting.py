"""Batch lines count against their key's limits and usage like live requests; files expire."""

import io
import json
import time

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, run_cli
from tests.support.processes import FakeUpstream, batch_jsonl, metric_total, scrape, wait_batch, wait_for

pytestmark = pytest.mark.integration

MASTER = "test-master-key-0123456789"


def test_a_free_keys_batch_cannot_exceed_its_daily_requests(gateway_factory: GatewayFactory,
                                                            upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=1, FREEFERENCE_BATCH_WINDOW_S="8")
    key = gateway.create_key("free", rpd=5, batch_lines=12)
    client = gateway.client(key)
    source = client.files.create(file=("in.jsonl", io.BytesIO(batch_jsonl(8))), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "in_progress"

    # The key's cap on queued batch lines: 8 queued, 5 more would pass 12.
    more = client.files.create(file=("more.jsonl", io.BytesIO(batch_jsonl(5, prefix="more"))), purpose="batch")
    refused = client.batches.create(input_file_id=more.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.status == "failed"
    assert [e.code for e in refused.errors.data] == ["queued_lines_limit_exceeded"]

    # Five lines use up the day; the rest wait (they do not fail) until the batch's window ends.
    done = wait_batch(client, batch.id, {"completed", "expired"}, timeout_s=60)
    assert done.status == "expired"
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 3)
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert len(upstream.requests()) == 5
    # The same day's budget refuses the key's live requests now.
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])

    # Usage shows the batch lines, apart from live requests, with their tokens.
    key_id = json.loads(run_cli("keys", "show", key, env=gateway.env).stdout)["id"]
    usage = httpx.get(f"{gateway.base_url}/admin/keys/{key_id}/usage", timeout=5,
                      headers={"Authorization": f"Bearer {MASTER}"}).json()
    assert usage["batch_total"]["requests"] == 5 and usage["batch_total"]["completion_tokens"] > 0
    assert usage["days"][0]["models"] == {}  # the refused live request never ran
    assert sum(m["requests"] for m in usage["days"][0]["batch"].values()) == 5
    printed = json.loads(run_cli("keys", "usage", key, env=gateway.env).stdout)
    assert printed["batch_total"] == usage["batch_total"]
    # And the upstream attempts are in /metrics, counted for the whole pool.
    assert metric_total(scrape(gateway), "freeference_batch_upstream_attempts_total", outcome="ok") == 5


def test_files_expire_by_default_and_as_asked(gateway_factory: GatewayFactory, upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=1, FREEFERENCE_FILE_EXPIRY_S="2",
                              FREEFERENCE_BATCH_STORAGE_MAX_BYTES_PER_KEY="100000")
    client = gateway.client(gateway.create_key("free"))
    short = client.files.create(file=("a.jsonl", io.BytesIO(b"x" * 60_000)), purpose="batch")
    assert short.expires_at == short.created_at + 2
    with pytest.raises(openai.BadRequestError):  # the quota is full while it lives
        client.files.create(file=("b.jsonl", io.BytesIO(b"x" * 60_000)), purpose="batch")

    def gone() -> bool:
        try:
            client.files.retrieve(short.id)
        except openai.NotFoundError:
            return True
        return False

    wait_for(gone, 20, "the file to expire")
    assert short.id not in [f.id for f in client.files.list()]
    # The workers' sweep deletes it and gives its bytes back to the quota.
    wait_for(lambda: _uploads(client), 20, "the quota to be given back")

    asked = client.files.create(file=("c.jsonl", io.BytesIO(batch_jsonl(2))), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": 7200})
    assert asked.expires_at == asked.created_at + 7200
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("d.jsonl", io.BytesIO(b"x")), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 60})
    assert info.value.body["param"] == "expires_after[seconds]"
    batch = client.batches.create(input_file_id=asked.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 3600})
    done = wait_batch(client, batch.id, {"completed"}, timeout_s=30)
    output = client.files.retrieve(done.output_file_id)
    assert output.expires_at == output.created_at + 3600


def _uploads(client: openai.OpenAI) -> bool:
    try:
        client.files.create(file=("b.jsonl", io.BytesIO(b"x" * 60_000)), purpose="batch")
    except openai.BadRequestError:
        time.sleep(0.2)
        return False
    return True
