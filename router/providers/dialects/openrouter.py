"""OpenRouter's error shape: {"error": {"code": <int>, "message", "metadata"?}}.

metadata is what says why: the upstream's own answer (`raw`, often itself a JSON error, and
`provider_name`), a moderation verdict (`reasons`, `flagged_input`), on a 429 the rate-limit
headers (`headers`: X-RateLimit-Limit / -Remaining / -Reset in epoch ms) and where the limit
sits (`limit_source`: "upstream_provider_shared_pool" is that model's upstream, shared by
everyone; "openrouter_free_tier_daily" is the account's day). A daily free-model cap reads
"Rate limit exceeded: free-models-per-day" (openrouter.ai/docs/api/reference/errors-and-debugging,
openrouter.ai/docs/api/reference/limits; payloads in docs/providers.md).
"""

from typing import Any

import orjson

from router.providers.dialects import openai
from router.providers.dialects.detail import ErrorDetail, read_message_hints
from router.providers.sanitize import sanitize


def parse(data: Any) -> ErrorDetail:
    """An OpenRouter error body, its metadata folded into the message and the quota fields."""
    detail = openai.parse(data)
    error = data.get("error") if isinstance(data, dict) else None
    metadata = error.get("metadata") if isinstance(error, dict) else None
    if not isinstance(metadata, dict):
        return detail
    headers = metadata.get("headers")
    if isinstance(headers, dict):
        detail.headers = {str(k): str(v) for k, v in headers.items() if isinstance(v, str | int | float)}
    extra: list[str] = []
    if isinstance(metadata.get("provider_name"), str):
        extra.append(f"provider {metadata['provider_name']}")
    raw = metadata.get("raw")
    if raw is not None:
        text = _raw_message(raw)
        if text:
            extra.append(text)
            read_message_hints(detail, text)
    reasons = metadata.get("reasons")
    if isinstance(reasons, list) and reasons:
        extra.append("flagged: " + ", ".join(str(r) for r in reasons[:5]))
    if extra:
        detail.message = sanitize(f"{detail.message} ({'; '.join(extra)})")
    source = metadata.get("limit_source")
    if "free-models-per-day" in detail.message or source == "openrouter_free_tier_daily":
        detail.daily = True
        detail.scope = "account"
    elif source == "upstream_provider_shared_pool":
        detail.scope = "model"  # that model's upstream is busy for everyone: not our key's quota
    return detail


def _raw_message(raw: Any) -> str:
    if isinstance(raw, str):
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return str(raw)
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict):
        error = raw.get("error", raw)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return ""
