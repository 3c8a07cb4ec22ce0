"""Batch records in Redis (fakeredis): leases, exactly-once results, crash re-queue, finalization."""

import time
from collections.abc import AsyncIterator

import orjson
import pytest
from fakeredis.aioredis import FakeRedis

from api.batches import store as api_store
from workers.batch_store import BatchStore, output_line
from workers.protocol import BATCH_ACTIVE_KEY, BatchLine, BatchSpec, ChatJob, batch_part_key, worker_heartbeat_key


@pytest.fixture
async def redis() -> AsyncIterator[FakeRedis]:
    client = FakeRedis()
    yield client
    await client.aclose()


def _lines(count: int) -> list[BatchLine]:
    job = ChatJob(job_id="j", request_id="", reply_channel="", body={"messages": []}, stream=False,
                  requested_model=None, key_id="key_a", tier="free", deadline_unix_ms=0)
    return [BatchLine(custom_id=f"c{i}", job=job) for i in range(count)]


async def _started(redis: FakeRedis, count: int) -> BatchSpec:
    now = int(time.time())
    spec = BatchSpec(id="batch_" + "1" * 24, owner="key_a", endpoint="/v1/chat/completions", input_file_id="file-1",
                     completion_window="24h", created_at=now, expires_at=now + 60)
    await api_store.create_batch(redis, spec)
    assert await api_store.start_batch(redis, spec, _lines(count), cap=1000) is None
    return spec


async def _alive(redis: FakeRedis, worker_id: str) -> BatchStore:
    await redis.set(worker_heartbeat_key(worker_id), b"{}", px=3000)
    return BatchStore(redis, worker_id)


async def test_each_result_is_recorded_once_and_the_batch_finalizes(redis: FakeRedis) -> None:
    spec = await _started(redis, 3)
    worker = await _alive(redis, "w1")
    leased = (await worker.claim(spec.id, 10, cap=10)).leased
    assert [(x.idx, x.line.custom_id, x.tokens_charged) for x in leased] == [(0, "c0", 0), (1, "c1", 0), (2, "c2", 0)]
    assert (await worker.claim(spec.id, 10, cap=10)).leased == []
    usage = {"prompt_tokens": 7, "completion_tokens": 3}
    assert await worker.record(spec, 0, "c0", output_line("c0", "r", 200, {"ok": 0}), "completed", usage) == 2
    # A second run of the same line (e.g. after a lease was lost) changes nothing, usage included.
    assert await worker.record(spec, 0, "c0", output_line("c0", "r", 200, {"ok": 1}), "completed", usage) == -1
    assert await worker.record(spec, 2, "c2", output_line("c2", "r", 502, {"error": {}}), "failed") == 1
    assert not await worker.begin_finalize(spec.id)  # one line still running
    assert await worker.record(spec, 1, "c1", output_line("c1", "r", 200, {"ok": 1}), "completed") == 0
    assert await worker.begin_finalize(spec.id)
    assert not await BatchStore(redis, "w2").begin_finalize(spec.id)  # only one finalizer
    assert await worker.finalize(spec, stop="")

    batch = await api_store.get_batch(redis, "key_a", spec.id)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert (batch["usage"]["input_tokens"], batch["usage"]["output_tokens"], batch["usage"]["total_tokens"]) == (
        7, 3, 10)
    output = (await api_store.file_content(redis, "key_a", batch["output_file_id"])).splitlines()
    errors = (await api_store.file_content(redis, "key_a", batch["error_file_id"])).splitlines()
    assert [orjson.loads(x)["custom_id"] for x in output] == ["c0", "c1"]
    assert orjson.loads(output[0])["response"]["body"] == {"ok": 0}  # the first result won
    assert [orjson.loads(x)["response"]["status_code"] for x in errors] == [502]
    assert not await redis.sismember(BATCH_ACTIVE_KEY, spec.id)  # type: ignore[misc]
    assert not await redis.exists(batch_part_key(spec.id, "results"), batch_part_key(spec.id, "lines"))


async def test_lines_of_a_dead_worker_are_requeued(redis: FakeRedis) -> None:
    spec = await _started(redis, 4)
    doomed = await _alive(redis, "doomed")
    survivor = await _alive(redis, "survivor")
    taken = [x.idx for x in (await doomed.claim(spec.id, 2, cap=10)).leased]
    assert await survivor.reclaim(spec.id, set()) == 0  # its holder still heart-beats
    await redis.delete(worker_heartbeat_key("doomed"))
    assert await survivor.reclaim(spec.id, set()) == 2
    again = [x.idx for x in (await survivor.claim(spec.id, 10, cap=10)).leased]
    assert sorted(again) == [0, 1, 2, 3] and set(taken) <= set(again)
    # A late result from the dead worker's run is still recorded only once.
    assert await doomed.record(spec, 0, "c0", b"{}", "completed") == 3
    assert await survivor.record(spec, 0, "c0", b"{}", "completed") == -1


async def test_per_batch_cap_and_release(redis: FakeRedis) -> None:
    spec = await _started(redis, 10)
    a, b = await _alive(redis, "a"), await _alive(redis, "b")
    assert len((await a.claim(spec.id, 3, cap=4)).leased) == 3
    assert len((await b.claim(spec.id, 3, cap=4)).leased) == 1  # the cap is for the whole pool
    assert await a.release(spec.id, 0) == 1
    assert await b.release(spec.id, 0) == -1  # not its lease
    assert [x.idx for x in (await b.claim(spec.id, 1, cap=4)).leased] == [0]  # released lines come first
    # Retry accounting: a retried line goes to the back; out of tries on the third attempt.
    assert await b.release(spec.id, 0, retry_max_attempts=3) == 1
    assert [x.idx for x in (await b.claim(spec.id, 10, cap=10)).leased][-1] == 0
    assert await b.release(spec.id, 0, retry_max_attempts=3) == 1
    assert [x.idx for x in (await b.claim(spec.id, 10, cap=10)).leased] == [0]
    assert await b.release(spec.id, 0, retry_max_attempts=3) == 0


async def test_cancel_ends_with_every_unrun_line_in_the_error_file(redis: FakeRedis) -> None:
    spec = await _started(redis, 3)
    worker = await _alive(redis, "w")
    await worker.claim(spec.id, 1, cap=10)
    cancelled = await api_store.cancel_batch(redis, "key_a", spec.id)
    assert cancelled["status"] == "cancelling" and cancelled["cancelling_at"]
    assert (await worker.claim(spec.id, 5, cap=10)).state == "closed"  # nothing new starts
    assert not await worker.begin_finalize(spec.id)  # line 0 still leased
    assert await worker.record(spec, 0, "c0", b'{"custom_id":"c0"}', "completed") == 2
    assert await worker.begin_finalize(spec.id)
    assert await worker.finalize(spec, stop="cancel")
    batch = await api_store.get_batch(redis, "key_a", spec.id)
    assert batch["status"] == "cancelled" and batch["cancelled_at"]
    assert batch["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    errors = [orjson.loads(x) for x in (await api_store.file_content(redis, "key_a", batch["error_file_id"]))
              .splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("c1", "batch_cancelled"),
                                                                     ("c2", "batch_cancelled")]
    with pytest.raises(api_store.OpenAIError):
        await api_store.cancel_batch(redis, "key_a", spec.id + "x")
    assert (await api_store.cancel_batch(redis, "key_a", spec.id))["status"] == "cancelled"  # idempotent


async def test_expiry_and_finalizer_takeover(redis: FakeRedis) -> None:
    spec = await _started(redis, 2)
    crashed = await _alive(redis, "crashed")
    await crashed.record(spec, 0, "c0", b'{"custom_id":"c0"}', "completed")
    assert await crashed.expire(spec.id)
    assert not await crashed.expire(spec.id)  # once
    assert (await crashed.claim(spec.id, 5, cap=10)).leased == []  # an expiring batch starts nothing new
    assert await crashed.begin_finalize(spec.id)
    # The finalizer dies before writing anything; another worker takes over from it, once.
    rescuer = await _alive(redis, "rescuer")
    assert not await rescuer.begin_finalize(spec.id)
    assert await rescuer.begin_finalize(spec.id, take_over_from="crashed")
    assert not await crashed.finalize(spec, stop="expire")  # no longer the finalizer
    assert await rescuer.finalize(spec, stop="expire")
    batch = await api_store.get_batch(redis, "key_a", spec.id)
    assert batch["status"] == "expired" and batch["expired_at"]
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    errors = (await api_store.file_content(redis, "key_a", batch["error_file_id"])).splitlines()
    assert [orjson.loads(e)["error"]["code"] for e in errors] == ["batch_expired"]


async def test_interrupted_validation_fails_and_cleans_up(redis: FakeRedis) -> None:
    now = int(time.time())
    spec = BatchSpec(id="batch_" + "2" * 24, owner="key_a", endpoint="/v1/chat/completions", input_file_id="file-1",
                     completion_window="24h", created_at=now, expires_at=now + 60)
    await api_store.create_batch(redis, spec)
    # Lines half-written by an API process that died while validating.
    await redis.hset(batch_part_key(spec.id, "lines"), "0", _lines(1)[0].model_dump_json())  # type: ignore[misc]
    assert await redis.sismember(BATCH_ACTIVE_KEY, spec.id)  # type: ignore[misc]
    await BatchStore(redis, "w").fail_stale_validation(spec.id)
    batch = await api_store.get_batch(redis, "key_a", spec.id)
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "validation_interrupted"
    assert not await redis.exists(batch_part_key(spec.id, "lines"))


async def test_storage_quota_counts_uploads_and_results(redis: FakeRedis) -> None:
    first = await api_store.create_file(redis, "key_a", "a.jsonl", "batch", b"x" * 600, quota_bytes=1000)
    with pytest.raises(api_store.OpenAIError) as refused:
        await api_store.create_file(redis, "key_a", "b.jsonl", "batch", b"x" * 500, quota_bytes=1000)
    assert refused.value.status == 400 and refused.value.body.code == "storage_limit_exceeded"
    assert "600 in use" in refused.value.body.message
    assert [f.id for f in (await api_store.list_files(redis, "key_a", None, 10, None, "desc"))[0]] == [first.id]
    # Another key has its own quota; deleting gives the bytes back (once, even if deletes race).
    await api_store.create_file(redis, "key_b", "b.jsonl", "batch", b"x" * 900, quota_bytes=1000)
    await api_store.delete_file(redis, "key_a", first.id)
    await api_store.create_file(redis, "key_a", "b.jsonl", "batch", b"x" * 900, quota_bytes=1000)
    # Batch results count too (never refused: the work is done), so later uploads see them.
    spec = await _started(redis, 1)
    worker = await _alive(redis, "w")
    await worker.claim(spec.id, 1, cap=10)
    await worker.record(spec, 0, "c0", b"y" * 99, "completed")
    assert await worker.begin_finalize(spec.id) and await worker.finalize(spec, stop="")
    with pytest.raises(api_store.OpenAIError):
        await api_store.create_file(redis, "key_a", "c.jsonl", "batch", b"x" * 1, quota_bytes=1000)
