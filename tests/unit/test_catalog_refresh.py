"""Catalog: the default catalog's providers, and the /models refresh that retires vanished models."""

from collections.abc import Iterator

import fakeredis
import httpx
import orjson
import pytest

from router.catalog import RuntimeCatalog
from router.health import BreakerTuning, HealthStore, now_ms
from router.refresh import CatalogRefresher, listed_names
from settings.catalog import CatalogError, CatalogFile, load_catalog
from settings.config import DEFAULT_CATALOG, DEMO_CATALOG
from workers.protocol import LIVE_DEPLOYMENTS_KEY, LiveDeployment


def test_default_catalog_enables_providers_by_env() -> None:
    file = load_catalog(DEFAULT_CATALOG)
    assert RuntimeCatalog.build(file, {}).providers == {}
    catalog = RuntimeCatalog.build(file, {"GROQ_API_KEY": "gsk_x", "GROQ_API_KEY_2": "gsk_y",
                                          "OLLAMA_BASE_URL": "http://127.0.0.1:11434/v1/"})
    assert set(catalog.providers) == {"groq", "ollama"}
    assert catalog.providers["groq"].api_keys == ("gsk_x", "gsk_y")
    assert catalog.providers["ollama"].base_url == "http://127.0.0.1:11434/v1"
    assert "openrouter" in catalog.skipped and "OPENROUTER_API_KEY" in catalog.skipped["openrouter"]
    assert {d.provider.id for d in catalog.deployments} == {"groq", "ollama"}


def test_default_catalog_is_real_free_tier_providers() -> None:
    file = load_catalog(DEFAULT_CATALOG)
    urls = {p.id: p.base_url for p in file.providers}
    assert urls["openrouter"] == "https://openrouter.ai/api/v1"
    assert urls["groq"] == "https://api.groq.com/openai/v1"
    assert urls["gemini"] == "https://generativelanguage.googleapis.com/v1beta/openai"
    assert urls["cerebras"] == "https://api.cerebras.ai/v1"
    assert urls["mistral"] == "https://api.mistral.ai/v1"
    assert urls["cohere"] == "https://api.cohere.ai/compatibility/v1"
    assert urls["github"] == "https://models.github.ai/inference"
    assert all(m.id.endswith(":free") for m in file.models if m.provider == "openrouter")
    for intent in ("code", "reasoning", "general"):
        assert any(intent in m.scores for m in file.models), intent


@pytest.mark.parametrize(("models", "fragment"), [
    ('[{id: a, provider: p, upstream_name: a, context_window: 10, scores: {general: 1.5}}]', "scores"),
    ('[{id: a, provider: p, upstream_name: a, context_window: 10, scores: {poetry: 0.5}}]', "scores.poetry"),
])
def test_broken_scores_are_named(tmp_path, models: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"providers: [{{id: p, base_url: 'http://x'}}]\nmodels: {models}\n"
                    "capabilities: {text-basic: {name: G, intent: general}}\n")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert fragment in str(info.value)


def test_listed_names() -> None:
    gemini = orjson.dumps({"object": "list", "data": [{"id": "models/gemini-2.0-flash"}]})
    assert "gemini-2.0-flash" in (listed_names(gemini) or set())
    assert listed_names(b"<html>") is None
    assert listed_names(b'{"models": []}') is None


class _Provider:
    """A /models endpoint whose answer the test changes."""

    def __init__(self) -> None:
        self.models: list[str] | None = ["sim-general-large", "sim-general-small", "sim-coder", "sim-reasoner"]
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.models is None:
            return httpx.Response(503)
        return httpx.Response(200, json={"data": [{"id": m} for m in self.models]})


@pytest.fixture
def demo() -> Iterator[RuntimeCatalog]:
    yield RuntimeCatalog.build(load_catalog(DEMO_CATALOG), {"FREEFERENCE_DEMO_UPSTREAM_URL": "http://fake/v1"})


async def test_vanished_model_leaves_rotation_and_comes_back(demo: RuntimeCatalog) -> None:
    provider = demo.providers["simulated"]
    object.__setattr__(provider, "config", provider.config.model_copy(update={"refresh_models_s": 60.0}))
    redis = fakeredis.FakeAsyncRedis()
    upstream = _Provider()
    health = HealthStore(redis, BreakerTuning())
    async with httpx.AsyncClient(transport=httpx.MockTransport(upstream)) as client:
        refresher = CatalogRefresher(redis, demo, client, health, publish_every_s=5)
        coder = next(d for d in demo.deployments if d.model.id == "sim/coder")

        async def coder_state() -> str:
            return (await health.snapshot([coder])).of(coder).state(now_ms())

        upstream.models = ["sim-general-large", "sim-general-small", "sim-reasoner"]
        await refresher.maybe_refresh(provider)
        assert await coder_state() == "gone"
        # A second worker within the period does not refresh again (one lock per period).
        await refresher.maybe_refresh(provider)
        assert upstream.calls == 1
        await redis.delete("ff:catalog:refresh:simulated")
        upstream.models = None  # the listing fails: change nothing
        await refresher.maybe_refresh(provider)
        assert await coder_state() == "gone"
        await redis.delete("ff:catalog:refresh:simulated")
        upstream.models = ["sim-general-large", "sim-general-small", "sim-coder", "sim-reasoner"]
        await refresher.maybe_refresh(provider)
        assert await coder_state() == "closed"
        await refresher.publish_live()
        live = {k.decode(): LiveDeployment.model_validate_json(v)
                for k, v in (await redis.hgetall(LIVE_DEPLOYMENTS_KEY)).items()}  # type: ignore[misc]
        assert set(live) == {d.key for d in demo.deployments}
        assert live[coder.key].model == "sim/coder"
    await redis.aclose()


def test_catalog_file_is_strict() -> None:
    with pytest.raises(ValueError, match="unknown provider"):
        CatalogFile.model_validate({"providers": [], "models": [
            {"id": "a", "provider": "nope", "upstream_name": "a", "context_window": 1}], "capabilities": {}})
