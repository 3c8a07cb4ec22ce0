"""Hedged first token: the executor races a slow attempt against the next candidate; exactly one
reaches the caller. MockTransport upstream whose answers start when the test says, fakeredis."""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import httpx
import orjson
import pytest

from router.attempt import RunState
from router.catalog import Deployment, RuntimeCatalog
from router.failover import FailoverExecutor
from router.health import BreakerTuning, HealthStore
from router.hedge import HedgePolicy, HedgeTuning
from router.keys import KeyRotation
from router.keyspace import DeploymentHealth
from router.policy import Tuning
from router.providers.openai_compat import OpenAICompatProvider
from settings.catalog import CatalogFile
from tests.unit.test_failover_executor import sse

QUICK = HedgeTuning(enabled=True, multiplier=2.0, min_s=0.05, max_s=0.05, max_share=1.0)


class Upstream:
    """Per model: seconds before the answer's first byte (None: never), or an error status after it."""

    def __init__(self, delays: dict[str, float | None], errors: dict[str, int] | None = None,
                 pause_after_first: dict[str, float] | None = None) -> None:
        self.delays = delays
        self.errors = errors or {}
        self.pause_after_first = pause_after_first or {}  # model → seconds between its first chunk and the rest
        self.calls: list[str] = []
        self.closed_early: list[str] = []  # answers whose reader went away before they were sent

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        model = orjson.loads(request.content)["model"]
        self.calls.append(model)
        if model in self.errors:
            await asyncio.sleep(self.delays.get(model) or 0)
            return httpx.Response(self.errors[model], json={"error": {"message": "down"}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self._body(model))

    async def _body(self, model: str) -> AsyncIterator[bytes]:
        delay = self.delays.get(model, 0.0)
        first, rest = sse(model).split(b"\n\n", 1)
        try:
            await asyncio.sleep(3600 if delay is None else delay)
            yield first + b"\n\n"
            await asyncio.sleep(self.pause_after_first.get(model, 0.0))
        except (asyncio.CancelledError, GeneratorExit):
            self.closed_early.append(model)
            raise
        yield rest


def deployments() -> list[Deployment]:
    file = CatalogFile.model_validate({
        "providers": [{"id": "p", "base_url": "http://up/v1", "requires_key": False}],
        "models": [{"id": m, "provider": "p", "upstream_name": m, "context_window": 1000,
                    "scores": {"general": s}} for m, s in (("a", 0.9), ("b", 0.8), ("c", 0.7))],
        "capabilities": {"text-basic": {"name": "G", "intent": "general"}},
    })
    return RuntimeCatalog.build(file, {}).deployments


@pytest.fixture
async def executor() -> AsyncIterator[Callable[..., FailoverExecutor]]:
    redis = fakeredis.FakeAsyncRedis()
    clients: list[httpx.AsyncClient] = []

    def make(upstream: Upstream, hedging: HedgeTuning = QUICK) -> FailoverExecutor:
        client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
        clients.append(client)
        return FailoverExecutor(OpenAICompatProvider(client), KeyRotation(), HealthStore(redis, BreakerTuning()),
                                Tuning(), hedging=hedging)

    yield make
    for client in clients:
        await client.aclose()
    await redis.aclose()


async def stream(executor: FailoverExecutor) -> tuple[str, list[str], RunState]:
    """One streamed request over a > b > c: (served model, the models of the chunks the caller got, state)."""
    ranked = deployments()
    state = RunState()
    seen: list[str] = []

    async def on_start(_: Deployment, __: int) -> None:
        return None

    async def on_chunk(chunk: dict[str, Any]) -> None:
        seen.append(chunk["model"])

    served = await executor.stream(ranked, {"messages": [], "stream": True}, state, await executor.snapshot(ranked),
                                   lambda: 30.0, on_start, on_chunk, forward_usage_chunk=False)
    return served.model.id, seen, state


async def test_a_late_first_token_is_hedged_and_the_slow_attempt_never_reaches_the_caller(
        executor: Callable[..., FailoverExecutor]) -> None:
    upstream = Upstream({"a": None, "b": 0.0})
    served, seen, state = await stream(executor(upstream))
    assert served == "b" and set(seen) == {"b"}
    assert upstream.calls == ["a", "b"] and upstream.closed_early == ["a"]  # cancelled, its connection closed
    assert state.hedges == [("p/a", "p", "won")]
    assert ("p/a", "hedge") in state.notes
    assert state.attempts == []  # slow is not failed: nothing counts against its breaker


async def test_the_slow_one_still_wins_when_its_token_comes_first(executor: Callable[..., FailoverExecutor]) -> None:
    upstream = Upstream({"a": 0.3, "b": None})
    served, seen, state = await stream(executor(upstream))
    assert served == "a" and set(seen) == {"a"}
    assert upstream.calls == ["a", "b"] and upstream.closed_early == ["b"]
    assert state.hedges == [("p/a", "p", "lost")]


async def test_a_primary_failing_before_its_token_leaves_the_hedge_to_answer(
        executor: Callable[..., FailoverExecutor]) -> None:
    upstream = Upstream({"a": 0.2, "b": 0.4}, errors={"a": 503})
    served, seen, state = await stream(executor(upstream))
    assert served == "b" and set(seen) == {"b"}
    assert [a.deployment for a in state.attempts] == ["p/a"]  # its failure is learned
    assert upstream.calls == ["a", "b"]  # and not retried beside a running hedge
    assert state.hedges == [("p/a", "p", "won")]


async def test_no_hedge_when_the_first_token_is_in_time_or_hedging_is_off(
        executor: Callable[..., FailoverExecutor]) -> None:
    upstream = Upstream({"a": 0.0})
    served, _, state = await stream(executor(upstream))
    assert (served, upstream.calls, state.hedges) == ("a", ["a"], [])
    upstream = Upstream({"a": 0.3, "b": 0.0})
    served, _, state = await stream(executor(upstream, HedgeTuning(enabled=False)))
    assert (served, upstream.calls, state.hedges) == ("a", ["a"], [])


async def test_a_non_streaming_answer_is_the_hedge_winner_whole(executor: Callable[..., FailoverExecutor]) -> None:
    upstream = Upstream({"a": None, "b": 0.0})
    ranked = deployments()
    ex = executor(upstream)
    state = RunState()
    completion, served = await ex.complete(ranked, {"messages": [], "stream": True}, state,
                                           await ex.snapshot(ranked), lambda: 30.0)
    assert served.model.id == "b"
    assert completion["choices"][0]["message"]["content"] == "hi from b"


async def _cancel_once(task: "asyncio.Task[object]", ready: Callable[[], bool], polls: int = 100) -> None:
    """Cancel `task` (the caller leaving) once `ready()` holds or after `polls` waits of 10 ms."""
    for _ in range(polls):
        await asyncio.sleep(0.01)
        if ready():
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)


async def test_the_caller_leaving_stops_both_attempts(executor: Callable[..., FailoverExecutor]) -> None:
    upstream = Upstream({"a": None, "b": None})
    ex = executor(upstream)
    await _cancel_once(asyncio.create_task(stream(ex)), lambda: len(upstream.calls) == 2)  # both attempts running
    assert sorted(upstream.closed_early) == ["a", "b"]
    assert not ex.inflight


async def test_the_caller_leaving_while_the_hedge_answers_stops_the_hedge(
        executor: Callable[..., FailoverExecutor]) -> None:
    upstream = Upstream({"a": None, "b": 0.0}, pause_after_first={"b": 3600})
    ex = executor(upstream)
    # Once the hedge's first token is the caller's.
    await _cancel_once(asyncio.create_task(stream(ex)), lambda: "a" in upstream.closed_early, polls=200)
    assert sorted(upstream.closed_early) == ["a", "b"]
    assert not ex.inflight


def test_the_threshold_follows_the_deployments_own_history_within_its_bounds() -> None:
    policy = HedgePolicy(HedgeTuning(enabled=True, multiplier=2.0, min_s=1.0, max_s=8.0))
    assert policy.threshold_s(DeploymentHealth()) == 8.0  # no history yet: the cap
    assert policy.threshold_s(DeploymentHealth(ewma_ms=100, ttft_var_ms2=0)) == 1.0  # fast: the floor
    steady = DeploymentHealth(ewma_ms=1500, ttft_var_ms2=250_000)  # p95 ≈ 1500 + 1.645 × 500
    assert policy.threshold_s(steady) == pytest.approx((1500 + 1.645 * 500) * 2 / 1000)
    assert policy.threshold_s(DeploymentHealth(ewma_ms=9000)) == 8.0


def test_hedges_are_a_bounded_share_of_a_deployments_requests_per_minute() -> None:
    now = [0.0]
    policy = HedgePolicy(HedgeTuning(enabled=True, max_share=0.1), clock=lambda: now[0])
    for _ in range(20):
        policy.started("p/a")
    assert policy.may_hedge("p/a")
    policy.hedged("p/a")
    policy.hedged("p/a")
    assert not policy.may_hedge("p/a")  # 2 of 20 is the share
    now[0] = 61.0  # a minute later the window is empty again: one hedge is always allowed
    assert policy.may_hedge("p/a")
    assert not HedgePolicy(HedgeTuning(enabled=False)).may_hedge("p/a")
