"""The worker's event publisher against a real server: order kept, subscriber counts returned."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from workers.events import EventPublisher

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_concurrent_publishes_arrive_in_order_with_subscriber_counts(redis: Redis) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe("ff:reply:a")
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    events = EventPublisher(redis.connection_pool)
    events.start()
    try:
        counts = await asyncio.gather(*(events.publish("ff:reply:a", b"event %d" % i) for i in range(50)),
                                      events.publish("ff:reply:nobody", b"lost"))
        assert counts == [1] * 50 + [0]  # zero receivers: how a job learns its API process is gone
        received = []
        while (message := await pubsub.get_message(timeout=0.2)) is not None:
            received.append(message["data"])
        assert received == [b"event %d" % i for i in range(50)]
    finally:
        await events.close()
        await pubsub.aclose()


async def test_publishing_after_close_fails_clearly(redis: Redis) -> None:
    events = EventPublisher(redis.connection_pool)
    events.start()
    await events.close()
    with pytest.raises(RedisConnectionError):
        await events.publish("ff:reply:a", b"late")


async def test_a_command_that_fails_to_build_fails_its_caller_only(redis: Redis) -> None:
    events = EventPublisher(redis.connection_pool)
    events.start()

    def broken() -> tuple[str, str, bytes]:
        raise ValueError("a bug in a builder")

    try:
        failed = events.submit_built(broken)
        count = events.submit("ff:reply:nobody", b"beside it")  # queued now: in the same batch
        with pytest.raises(ValueError):
            await asyncio.wait_for(failed, 5)  # a publisher that died would leave it waiting
        assert await asyncio.wait_for(count, 5) == 0  # the batch it was in was still written
        assert await asyncio.wait_for(events.publish("ff:reply:nobody", b"later"), 5) == 0  # still running
    finally:
        await events.close()
