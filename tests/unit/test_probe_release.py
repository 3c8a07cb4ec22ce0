"""A half-open breaker's probe is freed at once when its attempt says nothing about the route.

Only one request at a time may probe a half-open deployment (HealthStore.claim_probe); a claim
that is never settled blocks every other probe for probe_ttl_s (30 s by default).
"""

import asyncio
from collections.abc import AsyncIterator

import fakeredis
import httpx
import pytest

from router.attempt import RunState
from router.catalog import Deployment, RuntimeCatalog
from router.failover import FailoverExecutor
from router.health import BreakerTuning, HealthStore
from router.keys import KeyRotation
from router.policy import Tuning
from router.providers.openai_compat import OpenAICompatProvider
from settings.catalog import CatalogFile
from tests.unit.test_failover_executor import ok

TUNING = BreakerTuning(failure_threshold=1, cooldown_s=0.001, max_cooldown_s=0.002, probe_ttl_s=30, ewma_alpha=0.5,
                       key_ban_s=60)


def deployments() -> list[Deployment]:
    file = CatalogFile.model_validate({
        "providers": [{"id": "p", "base_url": "http://p/v1", "api_keys_env": ["P_KEY"]},
                      {"id": "q", "base_url": "http://q/v1", "requires_key": False}],
        "models": [{"id": m, "provider": provider, "upstream_name": m, "context_window": 1000,
                    "scores": {"general": s}} for m, provider, s in (("a", "p", 0.9), ("b", "q", 0.8))],
        "capabilities": {"text-basic": {"name": "G", "intent": "general"}},
    })
    return RuntimeCatalog.build(file, {"P_KEY": "sk-test"}).deployments


@pytest.fixture
async def store() -> AsyncIterator[HealthStore]:
    redis = fakeredis.FakeAsyncRedis()
    yield HealthStore(redis, TUNING)
    await redis.aclose()


async def half_open(store: HealthStore, deployment: Deployment) -> None:
    assert await store.record_failure(deployment)  # opens for 1 ms
    await asyncio.sleep(0.01)
    assert (await store.snapshot([deployment])).of(deployment).state(await _now(store)) == "half_open"


async def _now(store: HealthStore) -> int:
    return (await store.snapshot([])).at_ms


def executor(store: HealthStore, handler: object) -> FailoverExecutor:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return FailoverExecutor(OpenAICompatProvider(client), KeyRotation(), store, Tuning())


async def test_a_probe_answered_with_our_key_refused_frees_the_probe(store: HealthStore) -> None:
    a, b = deployments()
    await half_open(store, a)

    def answer(request: httpx.Request) -> httpx.Response:
        if b'"model":"a"' in request.content:
            return httpx.Response(401, json={"error": {"message": "invalid api key"}})
        return ok("b")

    run = executor(store, answer)
    _, served = await run.complete([a, b], {"messages": [], "stream": True}, RunState(),
                                   await store.snapshot([a, b]), lambda: 30.0)
    assert served.model.id == "b"
    assert await store.claim_probe(a)  # another worker, with another key, may probe now


async def test_a_probe_cancelled_mid_attempt_frees_the_probe(store: HealthStore) -> None:
    a, b = deployments()
    await half_open(store, a)
    called = asyncio.Event()

    async def stall(request: httpx.Request) -> httpx.Response:
        called.set()
        await asyncio.sleep(30)
        return ok("a")

    run = executor(store, stall)
    job = asyncio.create_task(run.complete([a, b], {"messages": [], "stream": True}, RunState(),
                                           await store.snapshot([a, b]), lambda: 30.0))
    await asyncio.wait_for(called.wait(), 5)
    assert not await store.claim_probe(a)  # held by the running probe
    job.cancel()  # the caller left
    with pytest.raises(asyncio.CancelledError):
        await job
    assert await store.claim_probe(a)
