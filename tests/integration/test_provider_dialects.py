"""Each provider's dialect end to end: openai SDK → API → Redis → worker → the fake speaking that provider.

The catalog under test carries the shipped default catalog's profiles unchanged; only the base
URLs point at the fake, which answers as the provider would (bench/fake_dialects.py) and logs
any field the provider would have refused.
"""

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml
from redis import Redis

from settings.catalog import load_catalog
from settings.config import DEFAULT_CATALOG
from tests.integration.test_failover_support import FAST_ENV, MESSAGES, ask, forget_health
from tests.support.processes import FakeUpstream, Gateway
from workers.protocol import upstream_key_state_key

pytestmark = pytest.mark.integration

KEY = "sk-fake-a-0123456789"  # FAKE_A_KEY in base_env
DIALECTS = ("mistral", "groq", "cerebras", "gemini", "cohere", "openrouter", "github")
# One model per provider, each the best for one request shape so a test can pick a provider by
# pinning its model (pro key); "auto" prefers them in this order for general requests.
MODELS = {"openrouter": ("or-model:free", 0.97), "groq": ("groq-model", 0.96), "gemini": ("gemini-model", 0.95),
          "cerebras": ("cerebras-model", 0.94), "mistral": ("mistral-model", 0.93), "cohere": ("cohere-model", 0.92),
          "github": ("github-model", 0.91), "nousage": ("plain-model", 0.5)}


def dialect_catalog(root: str, refresh_s: float = 0) -> str:
    profiles = {p.id: p.profile.model_dump(mode="json") for p in load_catalog(DEFAULT_CATALOG).providers}
    timeout = {"connect_s": 1, "first_token_s": 2, "idle_s": 4, "total_s": 20}
    providers = []
    for name in (*DIALECTS, "nousage"):
        profile = profiles.get(name, {})
        if name == "github":
            profile["models"]["url"] = f"{root}/github/catalog/models"
        providers.append({"id": name, "base_url": f"{root}/{name}/v1", "api_keys_env": ["FAKE_A_KEY"],
                          "timeout": timeout, "refresh_models_s": refresh_s, "profile": profile})
    models = [{"id": model, "provider": provider, "upstream_name": model, "context_window": 32768,
               "capabilities": ["chat"], "scores": {"general": score, "code": score - 0.3},
               "supports_prefill": True} for provider, (model, score) in MODELS.items()]
    capabilities = {"text-basic": {"name": "General Chat Model", "intent": "general"},
                    "code": {"name": "Code Model", "intent": "code"}}
    families = [{"match": "*coder*", "scores": {"code": 0.65, "general": 0.4}},
                {"match": "*", "scores": {"general": 0.3}}]
    return yaml.safe_dump({"providers": providers, "models": models, "capabilities": capabilities,
                           "families": families}, sort_keys=False)


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway], fake_upstream: FakeUpstream) -> Gateway:
    return module_gateway_factory(workers=2, catalog=dialect_catalog(fake_upstream.root), **FAST_ENV)


@pytest.fixture
def keys(gateway: Gateway, upstream: FakeUpstream) -> Iterator[tuple[str, str]]:
    forget_health(gateway)
    yield gateway.create_key("free"), gateway.create_key("pro")


def sent(upstream: FakeUpstream, provider: str) -> list[dict[str, Any]]:
    return [r for r in upstream.requests() if r["dialect"] == provider]


# Everything a caller may send that some provider refuses, and that the request can go without.
EVERYTHING = {"seed": 7, "user": "caller-1", "frequency_penalty": 0.2, "presence_penalty": 0.1, "logit_bias": {},
              "n": 1, "store": False, "metadata": {"team": "a"}, "prompt_cache_key": "k1",
              "max_completion_tokens": 8, "parallel_tool_calls": True, "service_tier": "auto"}
VENDOR = {"chat_template_kwargs": {"enable_thinking": False}, "top_k": 20}
RICH_MESSAGES = [{"role": "developer", "content": "Be brief."},
                 {"role": "user", "content": "Tell me about failover.", "name": "ann"}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("provider", [*DIALECTS, "nousage"])
def test_no_field_a_provider_refuses_is_ever_sent(gateway: Gateway, upstream: FakeUpstream,
                                                  keys: tuple[str, str], provider: str, stream: bool) -> None:
    _, pro = keys
    model = MODELS[provider][0]
    client = gateway.client(pro, timeout=30)
    options = {"stream_options": {"include_usage": True}} if stream else {}
    raw = client.chat.completions.with_raw_response.create(model=model, messages=RICH_MESSAGES, stream=stream,
                                                           extra_body=VENDOR, **EVERYTHING, **options)
    if stream:
        chunks = list(raw.parse())
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = next((c.usage for c in reversed(chunks) if c.usage), None)
    else:
        completion = raw.parse()
        content, usage = completion.choices[0].message.content or "", completion.usage
    assert content.startswith(f"[{model}]")
    assert raw.headers["x-freeference-attempts"] == "1"  # nothing refused, nothing retried
    assert usage is not None and usage.total_tokens > 0  # the provider's, or the gateway's estimate
    (request,) = sent(upstream, provider)
    assert request["refused"] == []
    if provider in ("openrouter", "nousage"):  # lenient: vendor fields reach the model
        assert request["body"]["chat_template_kwargs"] == {"enable_thinking": False}


def test_a_request_a_provider_cannot_serve_is_not_sent_there(gateway: Gateway, upstream: FakeUpstream,
                                                             keys: tuple[str, str]) -> None:
    free, _ = keys
    # Groq refuses logprobs; it is not a hint to leave out: groq is skipped without a call.
    client = gateway.client(free, timeout=30)
    ask_kwargs = {"model": "auto", "messages": MESSAGES, "max_tokens": 8}
    openrouter = client.chat.completions.with_raw_response.create(**ask_kwargs, logprobs=True)
    assert openrouter.parse().model == "or-model:free"
    upstream.set_default("or-model:free", {"status": 503})
    answer = client.chat.completions.with_raw_response.create(**ask_kwargs, logprobs=True)
    assert answer.parse().model == "gemini-model"  # past openrouter (down) and groq (cannot serve it)
    assert sent(upstream, "groq") == []
    assert all(r["refused"] == [] for r in upstream.requests())


def test_without_provider_usage_the_gateway_estimates_it(gateway: Gateway, upstream: FakeUpstream,
                                                         keys: tuple[str, str]) -> None:
    _, pro = keys
    whole = ask(gateway, pro, stream=False, model="plain-model")
    assert whole.usage is not None and whole.usage.model_extra.get("estimated") is True
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0
    streamed = ask(gateway, pro, stream=True, model="plain-model")
    assert streamed.usage is not None and streamed.usage.model_extra.get("estimated") is True
    assert streamed.chunks[-1].choices == []  # the usage chunk ends the stream, as a provider's would


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_retry_delay_in_the_body_is_waited_exactly(gateway: Gateway, upstream: FakeUpstream,
                                                          keys: tuple[str, str], stream: bool) -> None:
    _, pro = keys
    upstream.script("gemini-model", {"status": 429, "retry_delay": "1.2s",
                                     "quota_id": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"})
    answer = ask(gateway, pro, stream, model="gemini-model")
    assert answer.model == "gemini-model" and answer.headers["x-freeference-attempts"] == "2"
    first, second = (r["t"] for r in sent(upstream, "gemini"))
    assert second - first >= 1.2  # never sooner than the body said


def key_state(gateway: Gateway, provider: str) -> dict[str, str]:
    from router.health import key_fingerprint

    with Redis.from_url(gateway.redis_url) as redis:
        raw = redis.hgetall(upstream_key_state_key(provider, key_fingerprint(KEY)))
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_gemini_day_quota_parks_that_model_until_midnight_pacific(gateway: Gateway, upstream: FakeUpstream,
                                                                  keys: tuple[str, str]) -> None:
    from router.providers.limits import seconds_until_daily_reset

    free, _ = keys
    upstream.set_default("or-model:free", {"status": 503})
    upstream.set_default("groq-model", {"status": 503})
    upstream.script("gemini-model", {"status": 429, "retry_delay": "57s",
                                     "quota_id": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"})
    for _ in range(3):
        assert ask(gateway, free, stream=False).model == "cerebras-model"
    assert len(sent(upstream, "gemini")) == 1  # one call per reset window
    parked_ms = int(key_state(gateway, "gemini")["m:gemini-model"])
    assert abs(parked_ms / 1000 - (time.time() + seconds_until_daily_reset("pacific_midnight"))) < 60


def test_openrouter_daily_cap_parks_the_account_until_its_reset(gateway: Gateway, upstream: FakeUpstream,
                                                                keys: tuple[str, str]) -> None:
    free, _ = keys
    upstream.script("or-model:free", {"status": 429, "daily": True, "reset_in_s": 7200})
    for _ in range(4):
        answer = ask(gateway, free, stream=True)
        assert answer.model == "groq-model"
    assert len(sent(upstream, "openrouter")) == 1
    parked_ms = int(key_state(gateway, "openrouter")["exhausted_until_ms"])
    assert abs(parked_ms / 1000 - (time.time() + 7200)) < 60


def test_groq_request_over_its_minute_budget_fails_over_without_cooling(gateway: Gateway, upstream: FakeUpstream,
                                                                        keys: tuple[str, str]) -> None:
    free, _ = keys
    upstream.set_default("or-model:free", {"status": 503})
    too_large = ("Request too large for model `groq-model` in organization `org_1` service tier `on_demand` on "
                 "tokens per minute (TPM): Limit 6000, Requested 14368, please reduce your message size and try "
                 "again.")
    upstream.script("groq-model", {"status": 413, "message": too_large, "error_code": "rate_limit_exceeded"})
    assert ask(gateway, free, stream=False).model == "gemini-model"
    # Not cooled, not parked: the next request that fits is served there.
    assert ask(gateway, free, stream=False).model == "groq-model"
    assert "exhausted_until_ms" not in key_state(gateway, "groq")


def test_github_models_token_cap_fails_over(gateway: Gateway, upstream: FakeUpstream, keys: tuple[str, str]) -> None:
    _, pro = keys
    long_prompt = [{"role": "user", "content": "word " * 9_000}]  # about 11k tokens: over the 8k cap
    answer = ask(gateway, pro, stream=False, model="github-model", messages=long_prompt,
                 extra_body={"models": ["plain-model"]})
    assert answer.model == "plain-model"
    (refused,) = sent(upstream, "github")
    assert refused["refused"] == []
    assert ask(gateway, pro, stream=False, model="github-model").model == "github-model"  # not cooled


def test_cerebras_day_headers_park_the_model_before_the_next_call(gateway: Gateway, upstream: FakeUpstream,
                                                                  keys: tuple[str, str]) -> None:
    _, pro = keys
    upstream.script("cerebras-model", {"quota": {"remaining": 0, "limit": 14400, "reset_s": 5000}})
    assert ask(gateway, pro, stream=False, model="cerebras-model").model == "cerebras-model"
    with pytest.raises(openai.APIStatusError) as info:
        ask(gateway, pro, stream=False, model="cerebras-model")
    assert info.value.status_code == 503  # the only candidate's quota is out: not tried
    assert len(sent(upstream, "cerebras")) == 1
    parked_ms = int(key_state(gateway, "cerebras")["m:cerebras-model"])
    assert abs(parked_ms / 1000 - (time.time() + 5000)) < 60


def test_a_vendor_field_a_strict_provider_does_not_list_is_left_out(gateway: Gateway, upstream: FakeUpstream,
                                                                    keys: tuple[str, str]) -> None:
    _, pro = keys
    answer = ask(gateway, pro, stream=True, model="mistral-model", extra_body={"safe_mode": True})
    assert answer.model == "mistral-model"
    assert "safe_mode" not in sent(upstream, "mistral")[0]["body"]


@pytest.mark.parametrize("provider", ["mistral", "gemini", "cohere"])
def test_a_refusal_its_profile_did_not_foresee_is_learned_once(gateway: Gateway, upstream: FakeUpstream,
                                                               keys: tuple[str, str], provider: str) -> None:
    _, pro = keys
    model = MODELS[provider][0]
    # The provider starts refusing a field the request may go without (as Mistral did stream_options).
    upstream.set_default(model, {"refuse": ["presence_penalty"]})
    answers = [ask(gateway, pro, stream=False, model=model, presence_penalty=0.5) for _ in range(4)]
    assert {a.model for a in answers} == {model}
    calls = sent(upstream, provider)
    # Each worker pays one refused call to learn it; after that the field is never sent there.
    refused = [r for r in calls if r["refused"]]
    assert 1 <= len(refused) <= 2
    assert all("presence_penalty" not in r["body"] for r in calls if not r["refused"])


def test_openrouter_provider_error_reason_reaches_the_caller(gateway: Gateway, upstream: FakeUpstream,
                                                             keys: tuple[str, str]) -> None:
    _, pro = keys
    upstream.set_default("or-model:free", {"status": 400, "message": "Provider returned error",
                                           "raw": '{"error":{"message":"Model supports at most 1 image per prompt."}}'})
    with pytest.raises(openai.BadRequestError) as info:
        ask(gateway, pro, stream=False, model="or-model:free")
    assert "supports at most 1 image per prompt" in info.value.message
    assert "{" not in info.value.message.split(":", 1)[1]  # the reason, not a repr of the body


def test_admin_providers_shows_keys_and_quota(gateway: Gateway, upstream: FakeUpstream,
                                              keys: tuple[str, str]) -> None:
    free, _ = keys
    upstream.script("or-model:free", {"status": 429, "daily": True, "reset_in_s": 3600})
    assert ask(gateway, free, stream=False).model == "groq-model"
    from router.health import key_fingerprint
    from workers.protocol import PROVIDER_STATUS_KEY, KeyCheck, ProviderStatus

    status = ProviderStatus(provider="openrouter", keys=[KeyCheck(fingerprint=key_fingerprint(KEY), reachable=True,
                                                                  valid=True, status=200, listed=3)])
    with Redis.from_url(gateway.redis_url) as redis:  # as a worker's refresh would have written it
        redis.hset(PROVIDER_STATUS_KEY, "openrouter", status.model_dump_json())
    response = httpx.get(gateway.base_url + "/admin/providers", timeout=5,
                         headers={"Authorization": f"Bearer {gateway.env['FREEFERENCE_MASTER_KEY']}"})
    assert response.status_code == 200
    (entry,) = [p for p in response.json()["data"] if p["provider"] == "openrouter"]
    quota = entry["keys"][0]["quota"]
    assert abs(quota["parked_until_ms"] / 1000 - (time.time() + 3600)) < 60
    assert KEY not in response.text
