"""Batch lines against their key's limits (fakeredis): charged at claim, paused not failed, capped, billed."""

import time
from collections.abc import AsyncIterator

import pytest
from fakeredis.aioredis import FakeRedis

from api.batches import store as api_store
from api.keys import KeyLimits, create_key, revoke_key
from api.usage import read_usage
from settings import Settings
from workers.batch_limits import BatchAccounting
from workers.batch_store import BatchStore, output_line
from workers.protocol import (
    DAY_S,
    FILES_EXPIRING_KEY,
    AttemptFailure,
    BatchLine,
    BatchSpec,
    ChatJob,
    batch_pause_key,
    owner_file_bytes_key,
    owner_queued_lines_key,
    window_reset_s,
    worker_heartbeat_key,
)


@pytest.fixture
async def redis() -> AsyncIterator[FakeRedis]:
    client = FakeRedis()
    yield client
    await client.aclose()


SETTINGS = Settings(free_rpm=100, free_tpm=100_000, free_rpd=100, batch_rate_share=0.8)


def _lines(owner: str, count: int, content: str = "hi") -> list[BatchLine]:
    body = {"messages": [{"role": "user", "content": content}]}
    job = ChatJob(job_id="j", request_id="", reply_channel="", body=body, stream=False, requested_model=None,
                  key_id=owner, tier="free", deadline_unix_ms=0)
    return [BatchLine(custom_id=f"c{i}", job=job) for i in range(count)]


async def _batch(redis: FakeRedis, owner: str, count: int, cap: int = 1000, content: str = "hi",
                 suffix: str = "1") -> BatchSpec:
    now = int(time.time())
    spec = BatchSpec(id="batch_" + suffix * 24, owner=owner, endpoint="/v1/chat/completions", input_file_id="file-1",
                     completion_window="24h", created_at=now, expires_at=now + 60)
    await api_store.create_batch(redis, spec)
    assert await api_store.start_batch(redis, spec, _lines(owner, count, content), cap=cap) is None
    return spec


async def _worker(redis: FakeRedis) -> BatchStore:
    await redis.set(worker_heartbeat_key("w"), b"{}", px=3000)
    return BatchStore(redis, "w")


async def test_lines_are_charged_and_a_refused_limit_pauses_the_keys_batches(redis: FakeRedis) -> None:
    _, record = await create_key(redis, name="k", tier="free", limits=KeyLimits(rpm=5, rpd=3))
    spec = await _batch(redis, record.id, 10)
    worker, accounting = await _worker(redis), BatchAccounting(redis, SETTINGS)
    now = time.time()
    # 80 % of 5 requests a minute are the batch's: 4, but the day allows 3.
    claim = await worker.claim(spec.id, 10, cap=10, budget=await accounting.budget(record.id, now))
    assert (len(claim.leased), claim.state) == (3, "paused")
    assert all(x.tokens_charged > 0 and not x.too_big for x in claim.leased)
    # Paused until the day's window ends (not a line failed).
    day_left_ms = window_reset_s(DAY_S, now) * 1000
    assert day_left_ms - 5_000 < await redis.pttl(batch_pause_key(record.id)) <= day_left_ms
    again = await worker.claim(spec.id, 10, cap=10, budget=await accounting.budget(record.id, now))
    assert (again.leased, again.state) == ([], "paused")
    assert await redis.llen(f"ff:batch:{spec.id}:pending") == 7  # type: ignore[misc]  # still queued

    # The share of the per-minute limit: with a roomy day, 4 of 5 a minute.
    _, other = await create_key(redis, name="o", tier="free", limits=KeyLimits(rpm=5))
    spec2 = await _batch(redis, other.id, 10, suffix="2")
    taken = await worker.claim(spec2.id, 10, cap=10, budget=await accounting.budget(other.id, now))
    assert (len(taken.leased), taken.state) == (4, "paused")


async def test_billing_corrects_tokens_and_shows_batch_usage_apart(redis: FakeRedis) -> None:
    _, record = await create_key(redis, name="k", tier="free")
    spec = await _batch(redis, record.id, 2)
    worker, accounting = await _worker(redis), BatchAccounting(redis, SETTINGS)
    now = time.time()
    first, second = (await worker.claim(spec.id, 2, cap=10, budget=await accounting.budget(record.id, now))).leased
    tokens_key = f"ff:rl:{record.id}:tokens:60:{int(now // 60)}"
    assert int(await redis.get(tokens_key)) == first.tokens_charged + second.tokens_charged
    await accounting.bill(record.id, first, now, "m1", usage={"prompt_tokens": 3, "completion_tokens": 4,
                                                               "total_tokens": 7},
                          failed=False, failures=[AttemptFailure(provider="p", deployment="p/m0", reason="http_500")],
                          served_by="p")
    await accounting.bill(record.id, second, now, "auto", usage=None, failed=True, failures=[], served_by=None)
    assert int(await redis.get(tokens_key)) == 7  # the estimate became the real count; the failure refunded
    [usage] = await read_usage(redis, [record.id], days=1)
    assert usage.days[0].models == {}  # no live requests
    assert usage.days[0].batch["m1"].model_dump() == {"requests": 1, "prompt_tokens": 3, "completion_tokens": 4,
                                                     "failures": 0}
    assert usage.batch_total.requests == 2 and usage.batch_total.failures == 1
    assert usage.total.requests == 2
    attempts = await redis.hgetall("ff:batches:upstream-attempts")  # type: ignore[misc]
    assert attempts == {b"p|http_500": b"1", b"p|ok": b"1"}


async def test_a_line_larger_than_the_whole_token_limit_is_leased_uncharged(redis: FakeRedis) -> None:
    _, record = await create_key(redis, name="k", tier="free", limits=KeyLimits(tpm=50))
    spec = await _batch(redis, record.id, 1, content="x" * 400)
    worker, accounting = await _worker(redis), BatchAccounting(redis, SETTINGS)
    [line] = (await worker.claim(spec.id, 5, cap=10, budget=await accounting.budget(record.id, time.time()))).leased
    assert line.too_big and line.tokens_charged == 0


async def test_a_revoked_keys_batch_is_cancelled_with_every_unrun_line_reported(redis: FakeRedis) -> None:
    key, record = await create_key(redis, name="k", tier="free")
    spec = await _batch(redis, record.id, 2)
    worker, accounting = await _worker(redis), BatchAccounting(redis, SETTINGS)
    await revoke_key(redis, key)
    claim = await worker.claim(spec.id, 5, cap=10, budget=await accounting.budget(record.id, time.time()))
    assert (claim.leased, claim.state) == ([], "revoked")
    assert await worker.stop_revoked(spec.id)
    assert await worker.begin_finalize(spec.id) and await worker.finalize(spec, stop="revoked")
    batch = await api_store.get_batch(redis, record.id, spec.id)
    assert batch["status"] == "cancelled" and batch["request_counts"]["failed"] == 2
    assert int(await redis.get(owner_queued_lines_key(record.id))) == 0


async def test_queued_lines_are_capped_per_key_and_counted_down(redis: FakeRedis) -> None:
    spec = await _batch(redis, "key_q", 3, cap=4)
    refused = BatchSpec(**{**spec.model_dump(), "id": "batch_" + "9" * 24})
    await api_store.create_batch(redis, refused)
    error = await api_store.start_batch(redis, refused, _lines("key_q", 2), cap=4)
    assert error is not None and error.code == "queued_lines_limit_exceeded" and "3 queued" in error.message
    worker = await _worker(redis)
    await worker.claim(spec.id, 1, cap=10)
    await worker.record(spec, 0, "c0", output_line("c0", "r", 200, {}), "completed")
    assert await api_store.queued_lines(redis, "key_q") == 2
    await worker.expire(spec.id)  # the two unrun lines leave the count when the batch ends
    assert await worker.begin_finalize(spec.id) and await worker.finalize(spec, stop="expire")
    assert await api_store.queued_lines(redis, "key_q") == 0


async def test_files_expire_and_give_their_bytes_back(redis: FakeRedis) -> None:
    kept = await api_store.create_file(redis, "key_f", "a.jsonl", "batch", b"x" * 10, 1000, expires_after_s=3600)
    due = await api_store.create_file(redis, "key_f", "b.jsonl", "batch", b"x" * 20, 1000, expires_after_s=0)
    assert kept.expires_at == kept.created_at + 3600
    with pytest.raises(api_store.OpenAIError):  # gone for its owner at once, before any sweep
        await api_store.get_file(redis, "key_f", due.id)
    assert [f.id for f in (await api_store.list_files(redis, "key_f", None, 10, None, "desc"))[0]] == [kept.id]
    assert await (await _worker(redis)).expire_files(time.time()) == 1
    assert int(await redis.get(owner_file_bytes_key("key_f"))) == 10
    assert await redis.zrange(FILES_EXPIRING_KEY, 0, -1) == [kept.id.encode()]
