"""Chaos: hundreds of concurrent requests while every provider fails at random.

Whatever happens upstream, each caller gets either a whole answer or a clear error: no
truncated success, no hang.
"""

import asyncio
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.integration.test_failover_support import FAST_ENV, MESSAGES, failover_catalog
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

REQUESTS = 300
CONCURRENCY = 100
MAX_TOKENS = 12
MODELS = ("general-best", "general-backup", "general-small", "coder")
# One token of the fake's replies: "[model]", " simulated", " reply:", " 7", or a continuation " cont3".
TOKEN = re.compile(r"\[[^\]]*\]| simulated| reply:| cont\d+| \d+")
# Clear errors: everything failed, everything cooling, past the deadline, or (on a starved test
# machine) no worker picked the job up in time.
CLEAR_ERRORS = {(502, "upstream_failed"), (503, "no_models_available"), (504, "timeout"), (503, "no_workers")}


def random_faults(rng: random.Random, count: int) -> list[dict[str, Any]]:
    menu: list[Callable[[], dict[str, Any]]] = [
        lambda: {}, lambda: {}, lambda: {}, lambda: {}, lambda: {}, lambda: {}, lambda: {}, lambda: {},
        lambda: {"status": rng.choice([500, 502, 503])},
        lambda: {"reset": True},
        lambda: {"status": 429, "retry_after": 1},
        lambda: {"status": 429},
        lambda: {"silence": True},
        lambda: {"cut_after": rng.randint(0, 8)},
        lambda: {"stall_after": rng.randint(1, 8)},
        lambda: {"malformed_after": rng.randint(1, 8)},
        lambda: {"no_done": True},
        lambda: {"token_interval_s": 0.02},
    ]
    return [rng.choice(menu)() for _ in range(count)]


def is_whole(content: str, finish_reason: str | None) -> bool:
    """All MAX_TOKENS tokens of a reply (possibly continued on another model) and a normal finish."""
    tokens = TOKEN.findall(content)
    return finish_reason == "stop" and "".join(tokens) == content and len(tokens) == MAX_TOKENS


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway], fake_upstream: FakeUpstream) -> Gateway:
    env = {**FAST_ENV, "FREEFERENCE_BREAKER_COOLDOWN_S": "0.5", "FREEFERENCE_BREAKER_MAX_COOLDOWN_S": "2",
           "FREEFERENCE_RATE_LIMIT_COOLDOWN_S": "1", "FREEFERENCE_REQUEST_TIMEOUT_S": "30",
           "FREEFERENCE_PICKUP_TIMEOUT_S": "10"}
    return module_gateway_factory(workers=2, catalog=failover_catalog(fake_upstream.url, idle_s=1.5), **env)


async def one(client: openai.AsyncOpenAI, stream: bool) -> tuple[str, str]:
    """('whole' | 'truncated' | 'error:<status>:<code>' | 'in-band-error', detail)."""
    try:
        if not stream:
            completion = await client.chat.completions.create(model="auto", messages=MESSAGES,
                                                              max_tokens=MAX_TOKENS)
            choice = completion.choices[0]
            whole = is_whole(choice.message.content or "", choice.finish_reason)
            return ("whole" if whole else "truncated"), choice.message.content or ""
        content, finish = "", None
        async for chunk in await client.chat.completions.create(model="auto", messages=MESSAGES,
                                                                max_tokens=MAX_TOKENS, stream=True):
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return ("whole" if is_whole(content, finish) else "truncated"), content
    except openai.APIStatusError as exc:
        return f"error:{exc.status_code}:{exc.code}", exc.message
    except openai.APIError as exc:  # an in-band error event after some chunks
        return "in-band-error", exc.message


async def storm(gateway: Gateway, key: str) -> tuple[list[tuple[str, str]], int]:
    client = openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", api_key=key, max_retries=0, timeout=60)
    limit = asyncio.Semaphore(CONCURRENCY)
    hangs = 0

    async def bounded(i: int) -> tuple[str, str]:
        nonlocal hangs
        async with limit:
            try:
                return await asyncio.wait_for(one(client, stream=i % 2 == 0), timeout=60)
            except TimeoutError:
                hangs += 1
                return "hang", ""

    try:
        results = await asyncio.gather(*(bounded(i) for i in range(REQUESTS)))
    finally:
        await client.close()
    return list(results), hangs


def test_random_failures_never_truncate_or_hang(gateway: Gateway, upstream: FakeUpstream) -> None:
    rng = random.Random(20261127)
    for model in MODELS:
        upstream.script(model, *random_faults(rng, REQUESTS * 2))
    key = gateway.create_key("pro")
    started = time.monotonic()
    results, hangs = asyncio.run(storm(gateway, key))
    elapsed = time.monotonic() - started
    outcomes = Counter(kind for kind, _ in results)
    print(f"chaos: {dict(outcomes)} in {elapsed:.1f}s, {len(upstream.requests())} upstream requests")
    assert hangs == 0
    assert outcomes["truncated"] == 0, [detail for kind, detail in results if kind == "truncated"][:5]
    assert sum(outcomes.values()) == REQUESTS
    for kind in outcomes:
        if kind.startswith("error:"):
            _, status, code = kind.split(":")
            assert (int(status), code) in CLEAR_ERRORS, kind
        else:
            assert kind in ("whole", "in-band-error"), kind
    assert outcomes["whole"] >= REQUESTS * 0.5
    # The faults really happened: failover made more upstream attempts than there were whole
    # answers, and many attempts were faulty. (Not "more attempts than requests": when breakers
    # open fast, many requests are answered 503 without any attempt, which is the policy.)
    seen = upstream.requests()
    assert len(seen) > outcomes["whole"]
    assert sum(1 for r in seen if r["fault"]) >= REQUESTS * 0.3
