"""Model listings in every shape, what the catalog learns from them, and the refresh that shares it."""

import fakeredis
import httpx
import orjson
import pytest

from router.catalog import RuntimeCatalog
from router.discovery import family, learn, parse_listing
from router.health import BreakerTuning, HealthStore, key_fingerprint, now_ms
from router.refresh import CatalogRefresher, check_provider, models_url
from settings.catalog import CatalogFile, load_catalog
from settings.config import DEFAULT_CATALOG
from workers.protocol import PROVIDER_STATUS_KEY, ProviderStatus

# openrouter.ai/docs/models (the Models API schema): one free model, one paid, one free with images.
OPENROUTER = orjson.dumps({"data": [
    {"id": "qwen/qwen3-coder:free", "canonical_slug": "qwen/qwen3-coder", "name": "Qwen: Qwen3 Coder (free)",
     "created": 1753230546, "context_length": 262144,
     "architecture": {"modality": "text->text", "input_modalities": ["text"], "output_modalities": ["text"],
                      "tokenizer": "Qwen3"},
     "pricing": {"prompt": "0", "completion": "0", "request": "0", "image": "0"},
     "top_provider": {"context_length": 262144, "max_completion_tokens": None, "is_moderated": False},
     "supported_parameters": ["max_tokens", "temperature", "tools", "tool_choice", "response_format"]},
    {"id": "qwen/qwen3-coder", "name": "Qwen: Qwen3 Coder", "context_length": 262144,
     "architecture": {"input_modalities": ["text"]}, "pricing": {"prompt": "0.0000002", "completion": "0.0000008"},
     "supported_parameters": ["tools"]},
    {"id": "google/gemma-4-31b-it:free", "name": "Google: Gemma 4 31B (free)", "context_length": 131072,
     "architecture": {"input_modalities": ["text", "image"]}, "pricing": {"prompt": "0", "completion": "0"},
     "supported_parameters": ["max_tokens", "temperature"]},
    {"id": "meta-llama/llama-3.3-70b-instruct:free", "name": "Meta: Llama 3.3 70B Instruct (free)",
     "context_length": 65536, "architecture": {"input_modalities": ["text"]},
     "pricing": {"prompt": "0", "completion": "0"}, "supported_parameters": ["tools"]},
]})
# Groq GET /openai/v1/models, as captured in public code (docs/providers.md)
GROQ = orjson.dumps({"object": "list", "data": [
    {"id": "llama-3.1-8b-instant", "object": "model", "created": 1693721698, "owned_by": "Meta", "active": True,
     "context_window": 131072, "public_apps": None, "max_completion_tokens": 131072},
    {"id": "whisper-large-v3", "object": "model", "owned_by": "OpenAI", "active": True, "context_window": 448}]})
# vllm/entrypoints/openai/protocol.py ModelCard
VLLM = orjson.dumps({"object": "list", "data": [
    {"id": "Qwen/Qwen2.5-Coder-7B-Instruct", "object": "model", "created": 1, "owned_by": "vllm",
     "root": "Qwen/Qwen2.5-Coder-7B-Instruct", "parent": None, "max_model_len": 32768, "permission": []}]})
# docs.github.com/en/rest/models/catalog (a bare list)
GITHUB = orjson.dumps([{"id": "openai/gpt-4.1", "name": "OpenAI GPT-4.1", "publisher": "OpenAI",
                        "limits": {"max_input_tokens": 1048576, "max_output_tokens": 32768},
                        "rate_limit_tier": "high", "supported_input_modalities": ["text", "image", "audio"]}])
GEMINI = orjson.dumps({"object": "list", "data": [{"id": "models/gemini-2.5-flash-lite", "object": "model",
                                                    "owned_by": "google"}]})


def test_every_listing_shape_is_read() -> None:
    openrouter = {m.id: m for m in parse_listing(OPENROUTER) or []}
    coder = openrouter["qwen/qwen3-coder:free"]
    assert (coder.context_window, coder.free, coder.tools, coder.json, coder.vision) == (262144, True, True, True,
                                                                                         False)
    assert openrouter["qwen/qwen3-coder"].free is False
    assert openrouter["google/gemma-4-31b-it:free"].vision is True
    groq = (parse_listing(GROQ) or [])[0]
    assert (groq.id, groq.context_window, groq.free) == ("llama-3.1-8b-instant", 131072, None)
    assert (parse_listing(VLLM) or [])[0].context_window == 32768
    github = (parse_listing(GITHUB) or [])[0]
    assert (github.id, github.vision, github.context_window) == ("openai/gpt-4.1", True, None)
    assert [m.id for m in parse_listing(GEMINI) or []] == ["gemini-2.5-flash-lite"]
    assert parse_listing(b"<html>") is None and parse_listing(b'{"error": "x"}') is None


def test_openrouter_listing_corrects_adds_free_only_and_retires() -> None:
    file = load_catalog(DEFAULT_CATALOG)
    provider = next(p for p in file.providers if p.id == "openrouter")
    learned = learn(file, provider, parse_listing(OPENROUTER) or [])
    # Catalog models it still lists get OpenRouter's own window; the ones it dropped are gone.
    assert learned.context == {"qwen/qwen3-coder:free": 262144, "meta-llama/llama-3.3-70b-instruct:free": 65536,
                               "google/gemma-4-31b-it:free": 131072}
    assert set(learned.gone) == {"nvidia/nemotron-3-super-120b-a12b:free", "openai/gpt-oss-20b:free"}
    # Nothing new and free here: the paid qwen3-coder is never added.
    assert learned.added == []


def test_a_listing_corrects_what_the_catalog_says_a_model_can_do() -> None:
    file = load_catalog(DEFAULT_CATALOG)
    provider = next(p for p in file.providers if p.id == "openrouter")
    gemma = next(m for m in file.models if m.id == "google/gemma-4-31b-it:free")
    listing = parse_listing(orjson.dumps({"data": [
        {"id": gemma.upstream_name, "context_length": gemma.context_window,
         "pricing": {"prompt": "0", "completion": "0"}, "architecture": {"input_modalities": ["text"]},
         "supported_parameters": ["response_format", "tools"]},
    ]})) or []
    features = learn(file, provider, listing).features[gemma.id]
    # It lists tools and JSON mode, no structured outputs and no images: the listing wins.
    assert set(features["capabilities"]) == {"chat", "tools", "json"}
    assert set(features["lacks"]) == {"structured_outputs", "vision"}


def test_a_newly_listed_free_model_is_added_with_family_scores_and_reported_capabilities() -> None:
    file = load_catalog(DEFAULT_CATALOG)
    provider = next(p for p in file.providers if p.id == "openrouter")
    listing = parse_listing(orjson.dumps({"data": [
        {"id": "acme/mega-coder-2:free", "name": "Acme Mega Coder 2 (free)", "context_length": 200000,
         "architecture": {"input_modalities": ["text", "image"]}, "pricing": {"prompt": "0", "completion": "0"},
         "supported_parameters": ["tools", "structured_outputs"]},
        {"id": "acme/mega-coder-2", "context_length": 200000, "pricing": {"prompt": "1e-6", "completion": "2e-6"}},
        {"id": "acme/guard-9b:free", "context_length": 8192, "pricing": {"prompt": "0", "completion": "0"}},
    ]})) or []
    learned = learn(file, provider, listing)
    assert [m.id for m in learned.added] == ["acme/mega-coder-2:free"]
    model = learned.added[0]
    assert model.context_window == 200000 and model.provider == "openrouter"
    assert set(model.capabilities) == {"chat", "code", "tools", "json", "structured_outputs", "vision"}
    assert model.lacks == []
    coder_family = family(model.id, file.families)
    assert coder_family is not None and model.scores == coder_family.scores
    # Below every curated code model: a discovered model is a fallback until someone scores it.
    assert all(model.scores["code"] < m.scores["code"] for m in file.models if "code" in m.capabilities)


def _file() -> CatalogFile:
    return CatalogFile.model_validate({
        "providers": [{"id": "p", "base_url": "http://up/v1", "api_keys_env": ["K1", "K2"],
                       "profile": {"models": {"discover": True}}}],
        "models": [{"id": "known", "provider": "p", "upstream_name": "known", "context_window": 4096,
                    "scores": {"general": 0.9}}],
        "capabilities": {"text-basic": {"name": "G", "intent": "general"}},
        "families": [{"match": "*", "scores": {"general": 0.5}}],
    })


def test_learned_models_and_windows_reach_the_deployments() -> None:
    catalog = RuntimeCatalog.build(_file(), {"K1": "a"})
    held = catalog.deployments
    taught = {"p": {"context": {"known": 8192},
                    "added": [{"id": "fresh", "provider": "p", "upstream_name": "fresh", "context_window": 2048,
                               "scores": {"general": 0.5}}]}}
    assert catalog.apply_learned(taught)
    assert {d.model.id: d.model.context_window for d in held} == {"known": 8192, "fresh": 2048}
    assert [d.model.id for d in catalog.for_intent("general")] == ["known", "fresh"]
    assert not catalog.apply_learned(taught)  # nothing new: nothing rebuilt
    assert catalog.apply_learned({})
    assert {d.model.id: d.model.context_window for d in held} == {"known": 4096}


async def test_refresh_lists_with_every_key_bans_a_refused_one_and_shares_what_it_learned() -> None:
    seen_keys: list[str | None] = []

    def listing(request: httpx.Request) -> httpx.Response:
        seen_keys.append(request.headers.get("authorization"))
        if request.headers.get("authorization") == "Bearer bad":
            return httpx.Response(401, json={"error": {"message": "Invalid API key", "code": "invalid_api_key"}})
        return httpx.Response(200, json={"data": [{"id": "known", "context_window": 8192},
                                                  {"id": "fresh", "context_window": 2048}]})

    redis = fakeredis.FakeAsyncRedis()
    health = HealthStore(redis, BreakerTuning())
    mine = RuntimeCatalog.build(_file(), {"K1": "good", "K2": "bad"})
    other_worker = RuntimeCatalog.build(_file(), {"K1": "good", "K2": "bad"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(listing)) as client:
        await CatalogRefresher(redis, mine, client, health, 5).maybe_refresh(mine.providers["p"])
        assert seen_keys == ["Bearer good", "Bearer bad"]
        status = ProviderStatus.model_validate_json(await redis.hget(PROVIDER_STATUS_KEY, "p"))  # type: ignore[misc]
        assert [(k.fingerprint, k.valid) for k in status.keys] == [(key_fingerprint("good"), True),
                                                                  (key_fingerprint("bad"), False)]
        assert (status.listed, status.new, status.added) == (2, ["fresh"], ["fresh"])
        assert status.context_changed == {"known": [4096, 8192]}
        snap = await health.snapshot(mine.deployments)
        assert not snap.key("p", "bad").usable(now_ms()) and snap.key("p", "good").usable(now_ms())
        # Another worker applies what this one learned on its next tick.
        await CatalogRefresher(redis, other_worker, client, health, 5).sync_learned()
        assert {d.model.id: d.model.context_window for d in other_worker.deployments} == {"known": 8192,
                                                                                          "fresh": 2048}
    await redis.aclose()


@pytest.mark.parametrize(("provider", "url"), [
    ("github", "https://models.github.ai/catalog/models"),
    ("groq", "https://api.groq.com/openai/v1/models"),
])
def test_models_url(provider: str, url: str) -> None:
    catalog = RuntimeCatalog.build(load_catalog(DEFAULT_CATALOG), {"GITHUB_MODELS_TOKEN": "t", "GROQ_API_KEY": "g"})
    assert models_url(catalog.providers[provider]) == url


async def test_an_unreachable_provider_reports_per_key_and_teaches_nothing() -> None:
    def down(_: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    catalog = RuntimeCatalog.build(_file(), {"K1": "a"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as client:
        status, learned = await check_provider(client, catalog.providers["p"], catalog.file)
    assert learned is None and status.listed is None
    assert [(k.reachable, k.detail) for k in status.keys] == [(False, "ConnectError")]
