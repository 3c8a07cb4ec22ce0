"""A provider profile applied to one request body: what is renamed, dropped, or cannot be served.

Profiles are catalog data (settings.catalog.ProviderProfile, sources in docs/providers.md);
this module is the one place that reads their request side. It is compiled once per provider
and applied per attempt: a permissive profile returns the body as it is, a strict one costs a
pass over the body's top-level keys (and over the messages only when message fields differ).

A field the provider would refuse is never sent. When OpenAI's own semantics let a server
ignore it (a sampling hint, the user id, a value equal to the default) it is dropped; otherwise
this deployment cannot serve this request and the next candidate is tried (NotServable).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from router.errors import NotServable
from settings.catalog import ProviderProfile

# The request fields of OpenAI's chat completions API (platform.openai.com/docs/api-reference/chat).
# Anything else is a vendor field: passed to providers that take extra fields, dropped for strict ones.
OPENAI_FIELDS = frozenset({
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})

# Fields a server may ignore without changing what the answer means: sampling hints, ids for
# abuse monitoring and caching, storage and tier preferences, and the usage option (the gateway
# counts tokens itself when a provider sends none).
HINTS = frozenset({
    "seed", "user", "presence_penalty", "frequency_penalty", "service_tier", "store", "metadata",
    "prompt_cache_key", "safety_identifier", "stream_options", "verbosity", "reasoning_effort",
})

# OpenAI's defaults: sending the default and sending nothing ask for the same answer.
_DEFAULTS: dict[str, Any] = {
    "n": 1, "logprobs": False, "top_logprobs": 0, "parallel_tool_calls": True, "presence_penalty": 0,
    "frequency_penalty": 0, "logit_bias": {}, "service_tier": "auto", "store": False,
}

# Message fields whose loss changes the conversation; any other one (a participant name, a
# reasoning trace echoed back) may be left out.
_ESSENTIAL_MESSAGE_FIELDS = frozenset({"role", "content", "tool_calls", "tool_call_id"})

_MISSING = object()


@dataclass(frozen=True)
class CompiledProfile:
    """A ProviderProfile's request side, in the shapes the per-request pass needs."""

    accepts: frozenset[str] | None
    rejects: frozenset[str]
    renames: tuple[tuple[str, str], ...]
    extra_fields: bool
    message_fields: Mapping[str, frozenset[str]] | None
    message_rejects: frozenset[str]
    role_renames: Mapping[str, str]
    stream_options: bool

    @classmethod
    def compile(cls, profile: ProviderProfile) -> "CompiledProfile":
        """Sets and tuples from the catalog's lists."""
        top = frozenset(f for f in profile.rejects if not f.startswith("messages[]."))
        per_message = frozenset(f.removeprefix("messages[].") for f in profile.rejects if f.startswith("messages[]."))
        fields = {role: frozenset(names) for role, names in profile.message_fields.items()} \
            if profile.message_fields is not None else None
        return cls(accepts=frozenset(profile.accepts) if profile.accepts is not None else None, rejects=top,
                   renames=tuple(profile.renames.items()), extra_fields=profile.extra_fields,
                   message_fields=fields, message_rejects=per_message, role_renames=dict(profile.role_renames),
                   stream_options=profile.stream_options)

    @property
    def permissive(self) -> bool:
        """Nothing to change in any body: the per-request pass is skipped."""
        return (self.accepts is None and not self.rejects and not self.renames and self.extra_fields
                and self.message_fields is None and not self.message_rejects and not self.role_renames
                and self.stream_options)

    def accepts_field(self, name: str) -> bool:
        """Whether a top-level field may be sent as it is."""
        if name in self.rejects:
            return False
        if self.accepts is not None:
            return name in self.accepts
        return self.extra_fields or name in OPENAI_FIELDS


PERMISSIVE = CompiledProfile.compile(ProviderProfile())


def droppable(name: str, value: Any) -> bool:
    """Whether leaving this field out keeps the request's meaning (see the module docstring)."""
    if value is None or name not in OPENAI_FIELDS or name in HINTS:
        return True
    default = _DEFAULTS.get(name, _MISSING)
    return default is not _MISSING and value == default and type(value) is type(default)


def prepare(body: dict[str, Any], profile: CompiledProfile, provider: str) -> dict[str, Any]:
    """The body this provider accepts. Raises NotServable.

    `body` itself when nothing changes (callers copy before they write), else a new dict.
    """
    if profile.permissive:
        return body
    out = dict(body)
    for source, target in profile.renames:
        if source in out:
            value = out.pop(source)
            out.setdefault(target, value)  # a caller who sent both keeps the one the provider knows
    for name in [n for n in out if not profile.accepts_field(n)]:
        if not droppable(name, out[name]):
            raise NotServable(f"{provider} does not accept the request field '{name}'", feature=name)
        del out[name]
    if not profile.stream_options:
        out.pop("stream_options", None)
    messages = out.get("messages")
    if isinstance(messages, list) and (profile.message_fields is not None or profile.message_rejects
                                       or profile.role_renames):
        out["messages"] = [_message(m, profile, provider) if isinstance(m, dict) else m for m in messages]
    return out


def _message(message: dict[str, Any], profile: CompiledProfile, provider: str) -> dict[str, Any]:
    role = message.get("role")
    renamed = profile.role_renames.get(role, role) if isinstance(role, str) else role
    allowed = profile.message_fields.get(renamed) if profile.message_fields is not None and \
        isinstance(renamed, str) else None
    if profile.message_fields is not None and allowed is None:
        raise NotServable(f"{provider} does not accept {role!r} messages", feature=f"role:{role}")
    unwanted = [k for k in message if k in profile.message_rejects or (allowed is not None and k not in allowed)]
    if not unwanted and renamed == role:
        return message
    for name in unwanted:
        if name in _ESSENTIAL_MESSAGE_FIELDS and message[name] is not None:
            raise NotServable(f"{provider} does not accept '{name}' on {role} messages", feature=f"messages.{name}")
    copy = {k: v for k, v in message.items() if k not in unwanted}
    copy["role"] = renamed
    return copy
