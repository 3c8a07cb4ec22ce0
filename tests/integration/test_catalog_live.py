"""The live catalog through real processes: refresh adds, corrects and removes models (OpenRouter's listing)."""

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import yaml

from settings.catalog import load_catalog
from settings.config import DEFAULT_CATALOG
from tests.integration.test_failover_support import FAST_ENV, ask
from tests.support.processes import FakeUpstream, Gateway, wait_for

pytestmark = pytest.mark.integration


def live_catalog(root: str) -> str:
    openrouter = next(p for p in load_catalog(DEFAULT_CATALOG).providers if p.id == "openrouter")
    providers = [
        {"id": "openrouter", "base_url": f"{root}/openrouter/v1", "api_keys_env": ["FAKE_A_KEY"],
         "refresh_models_s": 0.5, "profile": openrouter.profile.model_dump(mode="json"),
         "timeout": {"connect_s": 1, "first_token_s": 2, "idle_s": 4, "total_s": 20}},
    ]
    models = [
        {"id": "or-old:free", "provider": "openrouter", "upstream_name": "or-old:free", "context_window": 32768,
         "scores": {"general": 0.9, "code": 0.8}},
        {"id": "or-kept:free", "provider": "openrouter", "upstream_name": "or-kept:free", "context_window": 4096,
         "scores": {"general": 0.7}},
    ]
    return yaml.safe_dump({
        "providers": providers, "models": models,
        "capabilities": {"text-basic": {"name": "General", "intent": "general"},
                         "code": {"name": "Code", "intent": "code"}},
        "families": [{"match": "*coder*", "capabilities": ["code"], "scores": {"code": 0.65, "general": 0.4}},
                     {"match": "*", "scores": {"general": 0.3}}]}, sort_keys=False)


def test_refresh_adds_free_models_corrects_windows_and_retires_vanished_ones(
        gateway_factory: Callable[..., Gateway], fake_upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=2, catalog=live_catalog(fake_upstream.root), **FAST_ENV)
    fake_upstream.set_models([{"id": "or-old:free"}, {"id": "or-kept:free", "context": 4096}])
    key = gateway.create_key("free")
    assert ask(gateway, key, stream=False, model="code").model == "or-old:free"
    long_prompt = [{"role": "user", "content": "word " * 8_000}]  # about 10k tokens: over or-kept's 4k

    # OpenRouter drops or-old, lists a new free coder (and a paid one), and says or-kept takes 65k.
    fake_upstream.set_models([{"id": "or-kept:free", "context": 65536},
                              {"id": "acme/new-coder:free", "context": 65536, "tools": True},
                              {"id": "acme/paid-coder", "context": 65536, "free": False}])

    def learned() -> bool:
        try:
            return ask(gateway, key, stream=False, model="code").model == "acme/new-coder:free"
        except openai.APIStatusError:  # during the switch a request may find nothing routable yet
            return False

    wait_for(learned, 20, "the discovered coder to serve code requests")
    # Each worker applies what the refresh learned on its own next tick (0.5 s here): give both one.
    time.sleep(1.5)
    for _ in range(4):
        assert ask(gateway, key, stream=False, model="code").model == "acme/new-coder:free"
    assert ask(gateway, key, stream=True, model="code").model == "acme/new-coder:free"
    wait_for(lambda: ask(gateway, key, stream=False, messages=long_prompt, max_tokens=8).model == "or-kept:free",
             15, "or-kept's corrected 65k window to take a 10k-token prompt")
    assert not any(r["model"] == "acme/paid-coder" for r in fake_upstream.requests())

    status = httpx.get(gateway.base_url + "/admin/providers", timeout=5,
                       headers={"Authorization": f"Bearer {gateway.env['FREEFERENCE_MASTER_KEY']}"}).json()
    (openrouter,) = [p for p in status["data"] if p["provider"] == "openrouter"]
    assert openrouter["vanished"] == ["or-old:free"]
    assert openrouter["added"] == ["acme/new-coder:free"]
    assert "acme/new-coder:free" in openrouter["new"]
    assert openrouter["context_changed"] == {"or-kept:free": [4096, 65536]}
    assert openrouter["keys"][0]["valid"] is True and openrouter["keys"][0]["listed"] == 3


def test_discovered_models_are_listed_for_pro_keys_and_pinnable(gateway_factory: Callable[..., Gateway],
                                                                 fake_upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=2, catalog=live_catalog(fake_upstream.root), **FAST_ENV)
    fake_upstream.set_models([{"id": "or-old:free"}, {"id": "or-kept:free", "context": 65536},
                              {"id": "acme/new-coder:free", "context": 65536, "tools": True}])
    pro, free = gateway.create_key("pro"), gateway.create_key("free")

    def listed() -> dict[str, Any]:
        cards = gateway.client(pro).models.list().data
        return {card.id: card for card in cards}

    wait_for(lambda: "acme/new-coder:free" in listed(), 20, "the discovered model in /v1/models")
    card = listed()["acme/new-coder:free"]
    assert card.context_window == 65536 and "tools" in card.capabilities
    assert listed()["or-kept:free"].context_window == 65536  # as the listing says, not the file's 4096
    answer = ask(gateway, pro, stream=False, model="acme/new-coder:free")
    assert answer.model == "acme/new-coder:free"
    assert "acme/new-coder:free" not in {c.id for c in gateway.client(free).models.list().data}
    with pytest.raises(openai.PermissionDeniedError) as info:
        ask(gateway, free, stream=False, model="acme/new-coder:free")
    assert info.value.code == "tier_not_allowed"
