"""One place that decides what an upstream error answer means (DESIGN.md §5, docs/failover.md).

Every non-2xx answer becomes one typed failure, in one of four classes:

(a) the request is invalid for every model: ContentRejected, RequestRejected, ContextTooLong
    (the last one is tried on a larger window first) — returned with the provider's reason;
(b) this deployment cannot serve this request: NotServable — a field or feature it does not
    take, a per-request token cap, OpenRouter's "No endpoints found that support tool use" or
    data-policy 404 — the next candidate is tried and nobody cools the deployment;
(c) the deployment is unhealthy: UpstreamServerError, UpstreamTimeout, ModelUnavailable — the
    breaker and the gone flag;
(d) quota: RateLimited — 429, 402, a per-minute token overrun — with the wait the provider
    states wherever it states it (headers, body, a 429's own headers) and its scope.

UpstreamAuthFailed (our key is bad) takes the key out of rotation. The dialect modules only read
bodies; the decisions are all here.
"""

import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

from router.errors import (
    ContentRejected,
    ContextTooLong,
    ModelUnavailable,
    NotServable,
    RateLimited,
    RequestRejected,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamServerError,
    UpstreamTimeout,
)
from router.providers import limits
from router.providers.dialects import ErrorDetail, parse_error
from settings.catalog import ProviderProfile

_CONTEXT_MARKERS = ("context_length", "context length", "maximum context", "too many tokens",
                    "prompt is too long", "reduce the length", "input token count")
_BAD_KEY_MARKERS = ("api_key_invalid", "api key not valid", "invalid api key", "invalid_api_key")
_POLICY_MARKERS = ("content_policy", "content policy", "content_filter", "safety", "moderation",
                   "flagged", "responsible ai")
_UNSUPPORTED_MARKERS = ("not supported", "unsupported", "does not support", "is not available for this model",
                        "extra inputs are not permitted", "unknown name")
_DEFAULT_PROFILE = ProviderProfile()


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from Retry-After (seconds or HTTP date) or retry-after-ms."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        try:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None


def error_for_status(status: int, body: bytes, headers: Mapping[str, str],
                     profile: ProviderProfile = _DEFAULT_PROFILE) -> UpstreamError:
    """Map a non-2xx upstream answer to its typed failure, reading the body in the provider's dialect."""
    detail = parse_error(body, profile.errors)
    message = detail.message
    lowered = f"{detail.code} {message}".lower()
    if status == 429:
        return rate_limited(status, detail, headers, profile)
    if status == 402:
        # Out of credits (OpenRouter: a negative balance blocks even free models): the key's
        # whole quota is gone until someone pays; no reset is stated.
        return RateLimited(message, retry_after_s=None, status=402, daily=True, scope="key")
    if status == 413:
        return _too_large(detail, lowered, headers, profile)
    if any(m in lowered for m in _POLICY_MARKERS) and status in (400, 403, 422):
        # OpenRouter answers moderation blocks with 403: a refusal, not a bad key of ours.
        return ContentRejected(message, status=400)
    if status in (401, 403) or any(m in lowered for m in _BAD_KEY_MARKERS):
        # Gemini reports an invalid key as 400 API_KEY_INVALID.
        return UpstreamAuthFailed(message, status=status)
    if status == 404:
        return _not_found(message, lowered)
    if "decommissioned" in lowered:
        return ModelUnavailable(message, status=status)
    if status == 408:
        return UpstreamTimeout(message, phase="total")
    if status in (400, 422):
        return _bad_request(status, detail, lowered)
    if status >= 500:
        return UpstreamServerError(message, status=status)
    return RequestRejected(message, status=status)


def rate_limited(status: int, detail: ErrorDetail, headers: Mapping[str, str],
                 profile: ProviderProfile) -> RateLimited:
    """Quota: the longest wait any part of the answer states, at the scope it names."""
    quota = limits.read({**detail.headers, **headers}, profile.limits.headers)
    waits = [w for w in (parse_retry_after(headers), detail.retry_after_s, quota.wait_s) if w]
    daily = detail.daily or quota.daily
    wait_s = max(waits) if waits else None
    if detail.daily_boundary or (daily and wait_s is None):
        # A day cap whose own answer names no reset (or only a short retry hint, as Gemini's
        # RetryInfo does for a per-day quota): it lapses at the provider's daily boundary.
        wait_s = max(wait_s or 0.0, limits.seconds_until_daily_reset(profile.limits.daily_reset))
    return RateLimited(detail.message, retry_after_s=wait_s, status=status, daily=daily, scope=detail.scope)


def _too_large(detail: ErrorDetail, lowered: str, headers: Mapping[str, str],
               profile: ProviderProfile) -> UpstreamError:
    # Groq: a request larger than the whole per-minute budget ("Limit 6000, Requested 14368")
    # can never pass there; one that only does not fit what is left of this minute is quota.
    if detail.token_cap is not None:
        limit, requested = detail.token_cap
        if requested > limit:
            return NotServable(f"request over this deployment's token limit: {detail.message}", status=413,
                               feature="tokens", limit_tokens=limit, requested_tokens=requested)
        return rate_limited(413, detail, headers, profile)
    if "rate_limit" in lowered and "too large" not in lowered:
        return rate_limited(413, detail, headers, profile)
    # GitHub Models' free tier: "tokens_limit_reached", "Request body too large for gpt-4o model.
    # Max size: 8000 tokens." — a per-request cap of this deployment.
    return NotServable(f"request over this deployment's size limit: {detail.message}", status=413, feature="tokens",
                       limit_tokens=detail.stated_window, requested_tokens=detail.stated_request)


def _not_found(message: str, lowered: str) -> UpstreamError:
    if "support tool use" in lowered:
        return NotServable(message, status=404, feature="tools")
    if "data policy" in lowered or "guardrail" in lowered:
        # OpenRouter: no endpoint of this model matches the account's privacy settings.
        return NotServable(message, status=404, feature="data_policy")
    return ModelUnavailable(message, status=404)


def _bad_request(status: int, detail: ErrorDetail, lowered: str) -> UpstreamError:
    message = detail.message
    if any(m in lowered for m in _CONTEXT_MARKERS) or detail.stated_window is not None:
        return ContextTooLong(message, status=400, limit_tokens=detail.stated_window,
                              requested_tokens=detail.stated_request)
    if any(m in lowered for m in _POLICY_MARKERS):
        return ContentRejected(message, status=400)
    if "model" in lowered and ("not found" in lowered or "does not exist" in lowered):
        return ModelUnavailable(message, status=status)
    if detail.refused_field is not None or any(m in lowered for m in _UNSUPPORTED_MARKERS):
        # A field or feature this provider does not take (a vendor field a strict provider
        # refuses, tools on a model without them): another model may well take it.
        return NotServable(message, status=status, feature=detail.refused_field or _feature(lowered))
    return RequestRejected(message, status=status)


def _feature(lowered: str) -> str | None:
    for marker, feature in (("tool", "tools"), ("image", "vision"), ("vision", "vision"),
                            ("response_format", "json"), ("json", "json")):
        if marker in lowered:
            return feature
    return None
