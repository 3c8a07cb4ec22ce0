"""The executor with provider profiles: refused fields are never sent, class (b) fails over without
cooling, quota parks at its scope, a daily cap costs one call. MockTransport upstream, fakeredis."""

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import httpx
import orjson
import pytest

from router.attempt import RunState
from router.catalog import Deployment, RuntimeCatalog
from router.failover import AllFailed, FailoverExecutor
from router.health import BreakerTuning, HealthStore, now_ms
from router.keys import KeyRotation
from router.policy import Tuning
from router.providers.openai_compat import OpenAICompatProvider
from settings.catalog import CatalogFile
from tests.unit.test_failover_executor import ok


class Upstream:
    """Scripted answers per model; records every body it was sent."""

    def __init__(self, script: dict[str, list[Callable[[], httpx.Response]]] | None = None) -> None:
        self.script = script or {}
        self.bodies: list[dict[str, Any]] = []

    @property
    def calls(self) -> list[str]:
        return [b["model"] for b in self.bodies]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        self.bodies.append(body)
        queue = self.script.get(body["model"]) or []
        return queue.pop(0)() if queue else ok(body["model"])


def catalog(profile: dict[str, Any]) -> dict[str, Deployment]:
    """a and c on keyed provider p1 (the profile under test), b on keyless p2; a > c > b."""
    file = CatalogFile.model_validate({
        "providers": [{"id": "p1", "base_url": "http://up/v1", "api_keys_env": ["K1"], "profile": profile},
                      {"id": "p2", "base_url": "http://up/v1", "requires_key": False}],
        "models": [{"id": m, "provider": p, "upstream_name": m, "context_window": 1000, "scores": {"general": s}}
                   for m, p, s in (("a", "p1", 0.9), ("c", "p1", 0.85), ("b", "p2", 0.8))],
        "capabilities": {"text-basic": {"name": "G", "intent": "general"}},
    })
    return {d.model.id: d for d in RuntimeCatalog.build(file, {"K1": "key-1"}).deployments}


@pytest.fixture
async def env() -> AsyncIterator[Callable[..., Any]]:
    redis = fakeredis.FakeAsyncRedis()
    clients: list[httpx.AsyncClient] = []

    def make(upstream: Upstream) -> FailoverExecutor:
        async def sleep(_: float) -> None:
            return None

        client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
        clients.append(client)
        return FailoverExecutor(OpenAICompatProvider(client), KeyRotation(), HealthStore(redis, BreakerTuning()),
                                Tuning(), sleep=sleep)

    yield make
    for client in clients:
        await client.aclose()
    await redis.aclose()


async def ask(executor: FailoverExecutor, deployments: dict[str, Deployment], order: str = "acb",
              **body: Any) -> tuple[str, RunState]:
    ranked = [deployments[m] for m in order]
    state = RunState()
    full = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}, **body}
    _completion, served = await executor.complete(ranked, full, state, await executor.snapshot(ranked), lambda: 30.0)
    return served.model.id, state


def answer(status: int, body: Any, **headers: str) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(status, json=body, headers=headers)


async def test_a_refused_field_the_request_needs_skips_the_deployment_without_a_call(env: Any) -> None:
    upstream = Upstream()
    served, state = await ask(env(upstream), catalog({"rejects": ["logprobs"]}), logprobs=True)
    assert served == "b" and upstream.calls == ["b"] and upstream.bodies[0]["logprobs"] is True
    assert [s.deployment for s in state.skipped] == ["p1/a", "p1/c"]
    assert state.attempts == []  # nothing reached a provider that refuses it


async def test_refused_hints_and_gateway_fields_are_dropped_not_sent(env: Any) -> None:
    upstream = Upstream()
    served, _ = await ask(env(upstream), catalog({"rejects": ["seed"], "stream_options": False}), seed=3)
    assert served == "a"
    assert "seed" not in upstream.bodies[0] and "stream_options" not in upstream.bodies[0]


async def test_every_candidate_refusing_the_request_is_a_not_servable_answer(env: Any) -> None:
    upstream = Upstream()
    deployments = catalog({"rejects": ["logprobs"]})
    with pytest.raises(AllFailed) as info:
        await ask(env(upstream), deployments, order="ac", logprobs=True)
    assert info.value.last.reason == "not_servable" and upstream.calls == []


MISTRAL_STORE = {"detail": [{"type": "extra_forbidden", "loc": ["body", "store"],
                             "msg": "Extra inputs are not permitted", "input": False}]}


async def test_a_refused_field_the_request_can_go_without_is_learned_and_dropped(env: Any) -> None:
    upstream = Upstream({"a": [answer(422, MISTRAL_STORE)]})
    executor = env(upstream)
    deployments = catalog({"errors": "mistral"})
    served, state = await ask(executor, deployments, store=False)
    assert served == "a" and upstream.calls == ["a", "a"]
    assert "store" in upstream.bodies[0] and "store" not in upstream.bodies[1]
    assert [a.reason for a in state.attempts] == ["not_servable"]
    await ask(executor, deployments, store=False)
    assert "store" not in upstream.bodies[2]  # never sent there again


NO_TOOLS = {"error": {"message": "No endpoints found that support tool use. To learn more about provider routing, "
                                 "visit: https://openrouter.ai/docs/provider-routing", "code": 404}}


async def test_not_servable_fails_over_without_cooling_and_is_remembered(env: Any) -> None:
    upstream = Upstream({"a": [answer(404, NO_TOOLS)]})
    executor = env(upstream)
    deployments = catalog({"errors": "openrouter"})
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    served, _ = await ask(executor, deployments, tools=tools)
    assert served == "c" and upstream.calls == ["a", "c"]
    snap = await executor.snapshot(list(deployments.values()))
    assert snap.of(deployments["a"]).state(now_ms()) == "closed"  # nobody else's request pays for it
    served, _ = await ask(executor, deployments, tools=tools)
    assert served == "c" and upstream.calls == ["a", "c", "c"]  # a is not asked again for tools
    served, _ = await ask(executor, deployments)
    assert served == "a"  # ...but still serves requests without tools


async def test_a_refusal_is_learned_by_every_worker_and_lapses(env: Any) -> None:
    upstream = Upstream({"a": [answer(404, NO_TOOLS)]})
    first, second = env(upstream), env(upstream)  # two workers, one Redis
    deployments = catalog({"errors": "openrouter"})
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert (await ask(first, deployments, tools=tools))[0] == "c"
    served, state = await ask(second, deployments, tools=tools)
    assert served == "c" and upstream.calls == ["a", "c", "c"]  # the other worker never asks a
    assert ("p1/a", "unsupported:tools") in state.notes
    snap = await second.snapshot(list(deployments.values()))
    assert 3_500_000 < snap.of(deployments["a"]).unsupported["tools"] - now_ms() <= 3_600_000


async def test_a_stated_window_routes_this_request_and_the_next_ones(env: Any) -> None:
    too_long = {"error": {"message": "This model's maximum context length is 600 tokens. However, you requested 700 "
                                     "tokens (600 in the messages, 100 in the completion).",
                          "code": "context_length_exceeded"}}
    upstream = Upstream({"a": [answer(400, too_long)]})
    executor = env(upstream)
    deployments = catalog({})
    # c's window is no larger than a's catalog one (1000 tokens each), but a said 600 and counted 700: c fits.
    served, state = await ask(executor, deployments)
    assert served == "c" and upstream.calls == ["a", "c"]
    snap = await executor.snapshot(list(deployments.values()))
    assert snap.of(deployments["a"]).window(1000, now_ms()) == 600  # every worker routes by it from now on
    assert [a.reason for a in state.attempts] == ["context_length"]


@pytest.mark.parametrize(("scope", "second"), [("model", "c"), ("key", "b")])
async def test_a_429_parks_the_key_at_its_scope(env: Any, scope: str, second: str) -> None:
    upstream = Upstream({"a": [answer(429, {"error": {"message": "slow down"}}, **{"retry-after": "120"})]})
    executor = env(upstream)
    deployments = catalog({"limits": {"scope": scope}})
    served, _ = await ask(executor, deployments)
    # model scope: the same key still serves the other model; key scope: it sits out entirely.
    assert served == second
    snap = await executor.snapshot(list(deployments.values()))
    state = snap.key("p1", "key-1")
    until = state.models.get("a", 0) if scope == "model" else state.exhausted_until_ms
    assert 110_000 < until - now_ms() <= 120_000
    # a's only key is out: a cools as long, so readers of deployment health alone (/v1/models/random)
    # see it out too; the breaker is untouched (the route itself is fine).
    assert snap.of(deployments["a"]).state(now_ms()) == "cooling" and snap.of(deployments["a"]).fails == 0
    assert 110_000 < snap.of(deployments["a"]).blocked_for_ms(now_ms()) <= 120_000


def openrouter_daily(reset_ms: int) -> dict[str, Any]:
    return {"error": {"message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model "
                                 "requests per day", "code": 429,
                      "metadata": {"headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                                               "X-RateLimit-Reset": str(reset_ms)}}}}


async def test_a_daily_cap_costs_one_call_until_its_reset(env: Any) -> None:
    reset_ms = int((time.time() + 3 * 3600) * 1000)
    upstream = Upstream({"a": [answer(429, openrouter_daily(reset_ms))]})
    executor = env(upstream)
    deployments = catalog({"errors": "openrouter", "limits": {"headers": "openrouter", "scope": "account"}})
    for _ in range(3):
        served, _ = await ask(executor, deployments)
        assert served == "b"
    assert upstream.calls == ["a", "b", "b", "b"]  # account scope: c (same account) is not tried either
    snap = await executor.snapshot(list(deployments.values()))
    parked = snap.key("p1", "key-1").exhausted_until_ms
    assert abs(parked - reset_ms) < 5_000


async def test_an_oversized_error_body_is_a_provider_error_that_fails_over(env: Any) -> None:
    huge = lambda: httpx.Response(500, content=b"x" * (2 * 1024 * 1024))  # noqa: E731
    upstream = Upstream({"a": [huge, huge]})
    served, state = await ask(env(upstream), catalog({}))
    assert served == "c"
    assert [a.reason for a in state.attempts] == ["server_error", "server_error"]
    assert "error body over" in state.attempts[0].message


async def test_a_json_answer_to_a_streamed_request_is_read_whole(env: Any) -> None:
    completion = {"id": "cmpl-1", "object": "chat.completion", "created": 1, "model": "a",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi from a"},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
    upstream = Upstream({"a": [answer(200, completion)]})
    executor = env(upstream)
    deployments = catalog({})
    state = RunState()
    ranked = [deployments["a"]]
    result, served = await executor.complete(ranked, {"messages": [], "stream": True}, state,
                                             await executor.snapshot(ranked), lambda: 30.0)
    assert served.model.id == "a" and result["choices"][0]["message"]["content"] == "hi from a"
    assert result["usage"]["total_tokens"] == 6
