"""Provider profiles applied to request bodies: renamed, dropped, or not servable — never sent refused."""

import pytest

from router.capabilities import request_needs
from router.errors import NotServable
from router.providers.profile import CompiledProfile, droppable, prepare
from settings.catalog import ProviderProfile, load_catalog
from settings.config import DEFAULT_CATALOG


def compiled(**fields: object) -> CompiledProfile:
    return CompiledProfile.compile(ProviderProfile.model_validate(fields))


def shipped(provider: str) -> CompiledProfile:
    config = next(p for p in load_catalog(DEFAULT_CATALOG).providers if p.id == provider)
    return CompiledProfile.compile(config.profile)


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "ann"}], "stream": True,
        "stream_options": {"include_usage": True}, "max_completion_tokens": 50, "seed": 7, "user": "u-1"}


def test_a_permissive_profile_sends_the_body_as_it_is() -> None:
    profile = compiled()
    assert profile.permissive
    assert prepare(BODY, profile, "p") is BODY  # nothing to change: not even a copy


def test_mistral_renames_drops_its_refused_fields_and_keeps_the_rest() -> None:
    out = prepare({**BODY, "chat_template_kwargs": {"x": 1}, "messages": [
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "", "reasoning_content": "hm"}]}, shipped("mistral"), "mistral")
    # docs/models/chatcompletionstreamrequest.md of mistralai/client-python
    assert out["max_tokens"] == 50 and "max_completion_tokens" not in out
    assert out["random_seed"] == 7 and "seed" not in out
    assert "stream_options" not in out and "user" not in out and "chat_template_kwargs" not in out
    assert out["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("field", ["logprobs", "logit_bias", "top_logprobs"])
def test_groq_cannot_serve_what_it_refuses_unless_it_is_the_default(field: str) -> None:
    value = {"logprobs": True, "logit_bias": {"50256": -100}, "top_logprobs": 3}[field]
    with pytest.raises(NotServable) as info:
        prepare({**BODY, field: value}, shipped("groq"), "groq")
    assert info.value.feature == field
    default = {"logprobs": False, "logit_bias": {}, "top_logprobs": 0}[field]
    assert field not in prepare({**BODY, field: default}, shipped("groq"), "groq")


def test_groq_n_must_be_one_and_message_names_are_dropped() -> None:
    out = prepare({**BODY, "n": 1}, shipped("groq"), "groq")
    assert "n" not in out and out["messages"] == [{"role": "user", "content": "hi"}]
    with pytest.raises(NotServable):
        prepare({**BODY, "n": 2}, shipped("groq"), "groq")


def test_cerebras_drops_penalties_but_cannot_turn_off_parallel_tool_calls() -> None:
    body = {**BODY, "frequency_penalty": 0.5, "presence_penalty": 0.2, "service_tier": "auto",
            "parallel_tool_calls": True}
    out = prepare(body, shipped("cerebras"), "cerebras")
    assert not {"frequency_penalty", "presence_penalty", "service_tier", "parallel_tool_calls"} & set(out)
    with pytest.raises(NotServable):
        prepare({**BODY, "parallel_tool_calls": False}, shipped("cerebras"), "cerebras")


def test_strict_providers_drop_unknown_vendor_fields_lenient_ones_pass_them() -> None:
    body = {**BODY, "chat_template_kwargs": {"enable_thinking": False}, "provider": {"order": ["x"]}}
    for strict in ("gemini", "mistral"):
        out = prepare(body, shipped(strict), strict)
        assert "chat_template_kwargs" not in out and "provider" not in out
    for lenient in ("openrouter", "vllm"):
        out = prepare(body, shipped(lenient), lenient)
        assert out["chat_template_kwargs"] == {"enable_thinking": False} and out["provider"] == {"order": ["x"]}


def test_no_provider_of_the_default_catalog_gets_a_field_its_profile_refuses() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    body = {**BODY, "frequency_penalty": 0.3, "presence_penalty": 0.1, "logit_bias": {}, "n": 1,
            "store": False, "metadata": {"a": "b"}, "prompt_cache_key": "k", "top_k": 5}
    for config in catalog.providers:
        profile = CompiledProfile.compile(config.profile)
        out = prepare(body, profile, config.id)
        assert all(profile.accepts_field(name) for name in out), config.id
        if not config.profile.stream_options:
            assert "stream_options" not in out


def test_an_unknown_role_for_a_strict_message_schema_is_not_servable() -> None:
    with pytest.raises(NotServable):
        prepare({**BODY, "messages": [{"role": "function", "name": "f", "content": "x"}]}, shipped("mistral"),
                "mistral")


def test_essential_message_fields_are_never_dropped_silently() -> None:
    profile = compiled(message_fields={"assistant": ["role", "content"], "user": ["role", "content"]})
    with pytest.raises(NotServable):
        prepare({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]}, profile, "p")


@pytest.mark.parametrize(("name", "value", "ok"), [
    ("seed", 3, True), ("user", "u", True), ("frequency_penalty", 1.0, True), ("n", 1, True), ("n", 2, False),
    ("logprobs", True, False), ("logprobs", False, True), ("parallel_tool_calls", True, True),
    ("parallel_tool_calls", False, False), ("tools", [{"type": "function"}], False), ("top_k", 40, True),
    ("response_format", {"type": "json_object"}, False), ("n", True, False),
])
def test_droppable(name: str, value: object, ok: bool) -> None:
    assert droppable(name, value) is ok


def test_request_needs() -> None:
    needs = request_needs({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                           "tools": [{"type": "function"}], "response_format": {"type": "json_object"},
                           "logprobs": None})
    assert {"tools", "vision", "json", "data_policy", "messages"} <= needs
    assert "logprobs" not in needs
