"""The executor follows the policy table: waits, retries and failover, with a recorded clock."""

from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import httpx
import orjson
import pytest

from router.attempt import RunState
from router.catalog import Deployment, RuntimeCatalog
from router.errors import ContentRejected
from router.failover import FailoverExecutor
from router.health import BreakerTuning, HealthStore
from router.keys import KeyRotation
from router.policy import Tuning
from router.providers.openai_compat import OpenAICompatProvider
from settings.catalog import CatalogFile

Handler = Callable[[str], httpx.Response]


def sse(model: str) -> bytes:
    frames = [{"choices": [{"index": 0, "delta": {"content": f"hi from {model}"}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    return b"".join(b"data: " + orjson.dumps({"id": "x", "model": model, **f}) + b"\n\n" for f in frames) + \
        b"data: [DONE]\n\n"


def ok(model: str) -> httpx.Response:
    return httpx.Response(200, content=sse(model), headers={"content-type": "text/event-stream"})


class Upstream:
    """Scripted answers per model; records which model each call was for."""

    def __init__(self, script: dict[str, list[Callable[[], httpx.Response]]]) -> None:
        self.script = script
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        model = orjson.loads(request.content)["model"]
        self.calls.append(model)
        queue = self.script.get(model) or []
        return queue.pop(0)() if queue else ok(model)


def deployments() -> list[Deployment]:
    file = CatalogFile.model_validate({
        "providers": [{"id": "p", "base_url": "http://up/v1", "requires_key": False}],
        "models": [{"id": m, "provider": "p", "upstream_name": m, "context_window": 1000,
                    "scores": {"general": s}} for m, s in (("a", 0.9), ("b", 0.8))],
        "capabilities": {"text-basic": {"name": "G", "intent": "general"}},
    })
    return RuntimeCatalog.build(file, {}).deployments


@pytest.fixture
async def run() -> AsyncIterator[Callable[..., Any]]:
    redis = fakeredis.FakeAsyncRedis()
    clients: list[httpx.AsyncClient] = []

    async def go(upstream: Upstream, budget_s: float = 30.0) -> tuple[str, list[float], RunState]:
        sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)

        client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
        clients.append(client)
        executor = FailoverExecutor(OpenAICompatProvider(client), KeyRotation(),
                                    HealthStore(redis, BreakerTuning()), Tuning(), sleep=sleep)
        ranked = deployments()
        state = RunState()
        completion, served = await executor.complete(ranked, {"messages": [], "stream": True}, state,
                                                     await executor.snapshot(ranked), lambda: budget_s)
        assert completion["choices"][0]["message"]["content"] == f"hi from {served.model.id}"
        return served.model.id, sleeps, state

    yield go
    for client in clients:
        await client.aclose()
    await redis.aclose()


def status(code: int, **headers: str) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(code, json={"error": {"message": f"HTTP {code}"}}, headers=headers)


async def test_short_retry_after_waits_exactly_then_same_model(run: Callable[..., Any]) -> None:
    upstream = Upstream({"a": [status(429, **{"retry-after": "2"})]})
    served, sleeps, _ = await run(upstream)
    assert (served, sleeps, upstream.calls) == ("a", [2.0], ["a", "a"])


async def test_a_wait_longer_than_the_budget_fails_over_instead(run: Callable[..., Any]) -> None:
    upstream = Upstream({"a": [status(429, **{"retry-after": "2"})]})
    served, sleeps, _ = await run(upstream, budget_s=2.2)
    assert (served, sleeps, upstream.calls) == ("b", [], ["a", "b"])


async def test_server_errors_one_jittered_retry_then_failover(run: Callable[..., Any]) -> None:
    upstream = Upstream({"a": [status(503), status(503)]})
    served, sleeps, state = await run(upstream)
    assert (served, upstream.calls) == ("b", ["a", "a", "b"])
    assert len(sleeps) == 1 and 0.1 <= sleeps[0] <= 0.2
    assert [a.reason for a in state.attempts] == ["server_error", "server_error"]


async def test_timeouts_are_not_retried(run: Callable[..., Any]) -> None:
    def timeout() -> httpx.Response:
        raise httpx.ConnectTimeout("slow")

    upstream = Upstream({"a": [timeout]})
    served, sleeps, _ = await run(upstream)
    assert (served, sleeps, upstream.calls) == ("b", [], ["a", "b"])


async def test_content_policy_is_returned(run: Callable[..., Any]) -> None:
    refusal = lambda: httpx.Response(400, json={"error": {"message": "flagged by the safety system",  # noqa: E731
                                                          "code": "content_policy_violation"}})
    upstream = Upstream({"a": [refusal]})
    with pytest.raises(ContentRejected, match="safety system"):
        await run(upstream)
    assert upstream.calls == ["a"]
