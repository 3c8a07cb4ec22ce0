"""How each real provider answers, for the fake upstream (bench/fake_upstream.py) to play it.

A request under /<dialect>/v1/... is answered in that provider's manner: what its API refuses
(and the 4xx it refuses it with), how its errors and rate-limit headers look, whether it sends
usage, and the shape of its model listing. The behaviours and their sources are listed in
docs/providers.md; where a provider's exact error text is not public the text here is
illustrative and only the shape is the provider's.
"""

import time
from dataclasses import dataclass, field
from typing import Any

# docs/models/chatcompletionstreamrequest.md and the message models of mistralai/client-python
MISTRAL_FIELDS = frozenset({
    "model", "messages", "temperature", "top_p", "max_tokens", "stream", "stop", "random_seed", "metadata",
    "response_format", "tools", "tool_choice", "presence_penalty", "frequency_penalty", "n", "prediction",
    "parallel_tool_calls", "reasoning_effort", "prompt_mode", "guardrails", "prompt_cache_key", "safe_prompt",
})
MISTRAL_MESSAGE_FIELDS = {"system": {"role", "content"}, "user": {"role", "content"},
                          "assistant": {"role", "content", "tool_calls", "prefix"},
                          "tool": {"role", "content", "tool_call_id", "name"}}
# OpenAI's request fields, for the dialect that refuses everything else (Gemini's endpoint).
OPENAI_FIELDS = frozenset({
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})


@dataclass(frozen=True)
class Dialect:
    """One provider's manner."""

    name: str
    accepts: frozenset[str] | None = None  # top-level fields it takes (None: any)
    rejects: frozenset[str] = frozenset()  # top-level fields it answers 4xx for
    rejects_message_fields: frozenset[str] = frozenset()
    message_fields: dict[str, set[str]] | None = None
    n_must_be_one: bool = False
    reject_status: int = 400
    # usage on the last chunk: "asked" (only with stream_options.include_usage), "always", "never"
    usage: str = "asked"
    # GitHub Models' free tier: a request over this many (estimated) tokens is a 413
    token_cap: int | None = None
    headers: str = "openai"  # rate-limit header names and units
    listing: str = "openai"  # model listing shape
    extra: dict[str, Any] = field(default_factory=dict)


DIALECTS: dict[str, Dialect] = {d.name: d for d in (
    Dialect("openai"),
    # An OpenAI-compatible server that ignores stream_options: no usage at all.
    Dialect("nousage", usage="never"),
    Dialect("mistral", accepts=MISTRAL_FIELDS, message_fields=MISTRAL_MESSAGE_FIELDS, reject_status=422,
            usage="always"),
    Dialect("groq", rejects=frozenset({"logprobs", "logit_bias", "top_logprobs"}),
            rejects_message_fields=frozenset({"name"}), n_must_be_one=True, headers="groq", listing="groq"),
    Dialect("cerebras", rejects=frozenset({"frequency_penalty", "presence_penalty", "logit_bias",
                                           "parallel_tool_calls", "service_tier"}), headers="cerebras"),
    Dialect("gemini", accepts=OPENAI_FIELDS - {"frequency_penalty", "prompt_cache_key"}, headers="none",
            listing="gemini"),
    Dialect("cohere", rejects=frozenset({"stream_options"})),
    Dialect("openrouter", headers="openrouter", listing="openrouter"),
    Dialect("github", token_cap=8000, listing="github"),
)}


def dialect_of(path: str) -> tuple[Dialect, str]:
    """The dialect a path names (/<dialect>/v1/...) and the path without it."""
    first, _, rest = path.lstrip("/").partition("/")
    if first in DIALECTS and first != "openai":
        return DIALECTS[first], "/" + rest
    return DIALECTS["openai"], path


def refused_fields(dialect: Dialect, body: dict[str, Any]) -> list[str]:
    """What of this body the provider would answer 4xx for ("messages[].name" for message fields)."""
    refused = [k for k in body if k in dialect.rejects or (dialect.accepts is not None and k not in dialect.accepts)]
    if dialect.n_must_be_one and body.get("n") not in (None, 1):
        refused.append("n")
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        allowed = dialect.message_fields.get(str(message.get("role"))) if dialect.message_fields else None
        for key in message:
            if key in dialect.rejects_message_fields or (dialect.message_fields is not None and
                                                        (allowed is None or key not in allowed)):
                refused.append(f"messages[].{key}")
    return list(dict.fromkeys(refused))


def refusal(dialect: Dialect, refused: list[str]) -> tuple[int, Any]:
    """The provider's 4xx for a body it refuses: (status, JSON body)."""
    name = refused[0]
    if dialect.name == "mistral":
        # 422 extra_forbidden (public reports quoted in docs/providers.md)
        loc = ["body", "messages", 0, "x", name.split(".", 1)[1]] if name.startswith("messages[]") else ["body", name]
        detail = [{"type": "extra_forbidden", "loc": loc, "msg": "Extra inputs are not permitted", "input": None}]
        return 422, {"object": "error", "message": {"detail": detail}, "type": "invalid_request_error",
                     "param": None, "code": None}
    if dialect.name == "gemini":
        message = f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
        return 400, [{"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT",
                                "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                             "fieldViolations": [{"description": message}]}]}}]
    return dialect.reject_status, {"error": {"message": f"'{name}' is not supported", "type": "invalid_request_error",
                                             "param": name, "code": None}}


def error_body(dialect: Dialect, fault: dict[str, Any], status: int, message: str,
               code: str) -> tuple[Any, dict[str, str]]:
    """A scripted error in the provider's shape: (JSON body, extra headers)."""
    headers: dict[str, str] = {}
    if dialect.name == "gemini":
        details: list[dict[str, Any]] = []
        if fault.get("quota_id"):
            details.append({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                 "quotaId": fault["quota_id"], "quotaDimensions": {"location": "global", "model": "m"}}]})
        if fault.get("retry_delay"):
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": fault["retry_delay"]})
        status_text = "RESOURCE_EXHAUSTED" if status == 429 else "INVALID_ARGUMENT"
        return [{"error": {"code": status, "message": message, "status": status_text, "details": details}}], headers
    if dialect.name == "openrouter":
        metadata: dict[str, Any] = {}
        if fault.get("daily"):
            message = ("Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests "
                       "per day")
        if "reset_in_s" in fault:
            reset_ms = str(int((time.time() + float(fault["reset_in_s"])) * 1000))
            metadata["headers"] = {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                                   "X-RateLimit-Reset": reset_ms}
            headers.update(metadata["headers"])
        if fault.get("raw"):
            metadata.update({"raw": fault["raw"], "provider_name": "Upstream"})
        body: dict[str, Any] = {"error": {"code": status, "message": message}}
        if metadata:
            body["error"]["metadata"] = metadata
        return body, headers
    if dialect.name == "mistral":
        return {"object": "error", "message": message, "type": code, "param": None, "code": None}, headers
    return {"error": {"message": message, "type": "fake_error", "code": code}}, headers


def quota_headers(dialect: Dialect, quota: dict[str, Any]) -> dict[str, str]:
    """Rate-limit headers in the provider's names and units for {"remaining", "limit", "reset_s", "window"}."""
    remaining, limit, reset_s = int(quota.get("remaining", 0)), int(quota.get("limit", 100)), float(
        quota.get("reset_s", 60))
    if dialect.headers == "groq":  # console.groq.com/docs/rate-limits: requests per day, durations
        minutes, seconds = divmod(reset_s, 60)
        return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": f"{int(minutes)}m{seconds:.2f}s",
                "x-ratelimit-limit-tokens": "18000", "x-ratelimit-remaining-tokens": "17997",
                "x-ratelimit-reset-tokens": "7.66s"}
    if dialect.headers == "cerebras":  # inference-docs.cerebras.ai/support/rate-limits: seconds
        return {"x-ratelimit-limit-requests-day": str(limit), "x-ratelimit-remaining-requests-day": str(remaining),
                "x-ratelimit-reset-requests-day": f"{reset_s}", "x-ratelimit-limit-tokens-minute": "60000",
                "x-ratelimit-remaining-tokens-minute": "59000", "x-ratelimit-reset-tokens-minute": "11.38"}
    if dialect.headers == "openrouter":  # epoch milliseconds
        return {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": str(int((time.time() + reset_s) * 1000))}
    if dialect.headers == "none":
        return {}
    return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": f"{reset_s}s"}


def listing(dialect: Dialect, models: list[Any]) -> Any:
    """GET /models in the provider's shape; a model is an id or {"id", "context", "free", "tools", "json",
    "structured", "vision"} (JSON mode is listed unless "json" is false)."""
    entries = [m if isinstance(m, dict) else {"id": m} for m in models]
    if dialect.listing == "openrouter":  # openrouter.ai/docs/models
        return {"data": [{"id": m["id"], "name": m["id"], "created": 0, "context_length": m.get("context", 32768),
                          "architecture": {"input_modalities": ["text", "image"] if m.get("vision") else ["text"],
                                           "output_modalities": ["text"]},
                          "pricing": {"prompt": "0" if m.get("free", True) else "0.000001",
                                      "completion": "0" if m.get("free", True) else "0.000002"},
                          "supported_parameters": ["max_tokens", "temperature", *(["tools"] if m.get("tools") else []),
                                                   *(["response_format"] if m.get("json", True) else []),
                                                   *(["structured_outputs"] if m.get("structured") else [])]}
                         for m in entries]}
    if dialect.listing == "groq":
        return {"object": "list", "data": [{"id": m["id"], "object": "model", "owned_by": "fake", "active": True,
                                            "context_window": m.get("context", 131072)} for m in entries]}
    if dialect.listing == "gemini":
        return {"object": "list", "data": [{"id": f"models/{m['id']}", "object": "model", "owned_by": "google"}
                                           for m in entries]}
    if dialect.listing == "github":  # docs.github.com/en/rest/models/catalog: a bare list
        return [{"id": m["id"], "name": m["id"], "publisher": "fake", "rate_limit_tier": "low",
                 "supported_input_modalities": ["text"]} for m in entries]
    return {"object": "list", "data": [{"id": m["id"], "object": "model", "created": 0, "owned_by": "fake",
                                        **({"context_window": m["context"]} if "context" in m else {})}
                                       for m in entries]}
