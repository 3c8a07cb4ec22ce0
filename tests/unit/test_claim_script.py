"""The worker's claim script (fakeredis with Lua): claim once, read, skip cancelled, announce."""

from collections.abc import AsyncIterator

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix
from fakeredis.aioredis import FakeRedis

from workers.claim import CLAIM_LUA, Claimer
from workers.protocol import accepted_payload, cancelled_job_key, new_job_id, reply_channel, split_event

QUEUE = "ff:queue"
PROCESS = "api0proc1"
ACCEPTED_TAIL = b" accepted " + accepted_payload("worker-1")


@pytest.fixture
async def redis() -> AsyncIterator[FakeRedis]:
    client = FakeRedis()
    yield client
    await client.aclose()


async def enqueue(redis: FakeRedis, job_id: str, score_ms: int = 1_000) -> None:
    await redis.set(job_key_prefix + job_id, b"payload of " + job_id.encode())
    await redis.zadd(QUEUE, {job_id: score_ms})


async def claim_with_health(redis: FakeRedis, *job_ids: str, health_keys: tuple[str, ...] = (),
                            now_ms: int = 2_000) -> tuple[list[object], list[list[object]]]:
    script = redis.register_script(CLAIM_LUA)
    hashes, flat = await script(keys=[QUEUE, *health_keys],
                                args=[in_progress_key_prefix, now_ms, 60_000, job_key_prefix, cancelled_job_key(""),
                                      reply_channel(""), ACCEPTED_TAIL, "1", *job_ids])
    return hashes, [flat[i:i + 5] for i in range(0, len(flat), 5)]


async def claim(redis: FakeRedis, *job_ids: str, now_ms: int = 2_000) -> list[list[object]]:
    return (await claim_with_health(redis, *job_ids, now_ms=now_ms))[1]


async def test_a_due_job_is_claimed_once_taken_off_the_queue_and_announced(redis: FakeRedis) -> None:
    job_id = new_job_id(PROCESS)
    await enqueue(redis, job_id)
    pubsub = redis.pubsub()
    await pubsub.subscribe(reply_channel(PROCESS))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation

    [(claimed_id, score, payload, cancelled, announced)] = await claim(redis, job_id)
    assert (claimed_id, payload, cancelled, announced) == (job_id.encode(), b"payload of " + job_id.encode(), 0, 1)
    assert float(score) == 1_000
    assert await redis.zscore(QUEUE, job_id) is None
    assert await redis.exists(in_progress_key_prefix + job_id)
    message = await pubsub.get_message(timeout=1)
    assert message is not None
    assert split_event(message["data"]) == (job_id, "accepted", accepted_payload("worker-1"))
    assert await claim(redis, job_id) == []  # a second worker gets nothing
    await pubsub.aclose()


async def test_a_job_not_yet_due_or_withdrawn_is_left_alone(redis: FakeRedis) -> None:
    later, withdrawn = new_job_id(PROCESS), new_job_id(PROCESS)
    await enqueue(redis, later, score_ms=5_000)
    await enqueue(redis, withdrawn)
    await redis.set(in_progress_key_prefix + withdrawn, b"withdrawn")  # the API's withdrawal took it first
    assert await claim(redis, later, withdrawn) == []
    assert await redis.zscore(QUEUE, later) == 5_000


async def test_a_job_whose_caller_left_is_claimed_but_not_announced(redis: FakeRedis) -> None:
    job_id = new_job_id(PROCESS)
    await enqueue(redis, job_id)
    await redis.set(cancelled_job_key(job_id), b"1")
    [(_, _, _, cancelled, announced)] = await claim(redis, job_id)
    assert (cancelled, announced) == (1, 0)


async def test_an_id_without_its_process_is_claimed_and_left_to_the_job_to_announce(redis: FakeRedis) -> None:
    job_id = "0123456789abcdef0123456789abcdef"  # an older API's plain uuid
    await enqueue(redis, job_id)
    [(_, _, payload, cancelled, announced)] = await claim(redis, job_id)
    assert payload is not None and (cancelled, announced) == (0, 0)


async def test_an_expired_job_comes_back_without_payload(redis: FakeRedis) -> None:
    job_id = new_job_id(PROCESS)
    await redis.zadd(QUEUE, {job_id: 1_000})  # its payload key has expired
    [(_, _, payload, _, announced)] = await claim(redis, job_id)
    assert payload is None and announced == 0


async def test_the_health_hashes_come_back_with_a_claim_and_only_then(redis: FakeRedis) -> None:
    await redis.hset("ff:health:fake-a/best", mapping={"fails": 2, "ewma_ms": 40})  # type: ignore[misc]
    job_id = new_job_id(PROCESS)
    await enqueue(redis, job_id)
    keys = ("ff:health:fake-a/best", "ff:health:never-seen")
    hashes, claimed = await claim_with_health(redis, job_id, health_keys=keys)
    assert len(claimed) == 1
    assert [dict(zip(h[::2], h[1::2], strict=True)) for h in hashes] == [{b"fails": b"2", b"ewma_ms": b"40"}, {}]
    assert await claim_with_health(redis, job_id, health_keys=keys) == ([], [])  # nothing claimed, nothing read


async def test_a_popped_job_is_claimed_without_reading_its_payload_whatever_its_score(redis: FakeRedis) -> None:
    job_id = new_job_id(PROCESS)
    # Enqueued by an API whose clock runs ahead of this worker's: a pop is due all the same.
    await enqueue(redis, job_id, score_ms=2**40)
    claimer = Claimer(redis, QUEUE, "worker-1", in_progress_ttl_ms=60_000, routable=[])
    claim = (await claimer.claim_popped([job_id]))[job_id]
    assert (claim.claimed, claim.runnable, claim.payload, claim.announced, claim.health) == (True, True, None, True,
                                                                                              None)
    assert await redis.zscore(QUEUE, job_id) is None
    assert not (await claimer.claim_popped([job_id]))[job_id].claimed  # a stale second entry of the same job


async def test_a_popped_job_that_was_withdrawn_expired_or_left_does_not_run(redis: FakeRedis) -> None:
    claimer = Claimer(redis, QUEUE, "worker-1", in_progress_ttl_ms=60_000, routable=[])
    withdrawn, expired, left = new_job_id(PROCESS), new_job_id(PROCESS), new_job_id(PROCESS)
    for job_id in (withdrawn, left):
        await enqueue(redis, job_id)
    await redis.zadd(QUEUE, {expired: 1_000})  # its payload key is gone
    await redis.set(in_progress_key_prefix + withdrawn, b"withdrawn")
    await redis.set(cancelled_job_key(left), b"1")
    claims = await claimer.claim_popped([withdrawn, expired, left])  # one pop's jobs, one claim
    assert not claims[withdrawn].claimed
    expired_claim, left_claim = claims[expired], claims[left]
    assert (expired_claim.claimed, expired_claim.expired, expired_claim.runnable) == (True, True, False)
    assert (left_claim.claimed, left_claim.cancelled, left_claim.runnable, left_claim.announced) == (True, True,
                                                                                                     False, False)


async def test_the_scan_leaves_young_jobs_to_the_ready_list(redis: FakeRedis) -> None:
    claimer = Claimer(redis, QUEUE, "worker-1", in_progress_ttl_ms=60_000, routable=[])
    old, young = new_job_id(PROCESS), new_job_id(PROCESS)
    await enqueue(redis, old, score_ms=1_000)
    await enqueue(redis, young, score_ms=1_900)
    claims = await claimer.claim([old, young], due_by_ms=1_500)  # now 2_500 less a grace of 1_000
    assert [(c.job_id, c.payload) for c in claims] == [(old, b"payload of " + old.encode())]
    assert await redis.zscore(QUEUE, young) == 1_900
