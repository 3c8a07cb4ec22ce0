"""How upstream error answers map to the four classes, with the providers' real error bodies.

Each payload is one a provider sent, as quoted in a public report (the source is beside it);
ids and keys in them are shortened. docs/providers.md lists the same sources.
"""

import time

import orjson
import pytest

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
from router.providers.classify import error_for_status, parse_retry_after
from router.providers.dialects import parse_error
from router.providers.limits import seconds_until_daily_reset
from settings.catalog import ProviderProfile


def _body(message: str, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "code": code}})


def profile(errors: str = "openai", headers: str = "openai", daily_reset: str = "utc_midnight") -> ProviderProfile:
    return ProviderProfile.model_validate({"errors": errors, "limits": {"headers": headers,
                                                                       "daily_reset": daily_reset}})


# --- Mistral: a strict pydantic schema (extra="forbid")
# github.com/avante-corp/avante.nvim/issues/2347, github.com/openai/openai-agents-python/issues/442
MISTRAL_STREAM_OPTIONS = (b'{"object":"error","message":{"detail":[{"type":"extra_forbidden","loc":["body",'
                          b'"stream_options","include_usage"],"msg":"Extra inputs are not permitted","input":true}]},'
                          b'"type":"invalid_request_error","param":null,"code":null}')
# github.com/editor-code-assistant/eca/issues/231
MISTRAL_MAX_COMPLETION = (b'{"object":"error","message":{"detail":[{"type":"extra_forbidden","loc":["body",'
                          b'"max_completion_tokens"],"msg":"Extra inputs are not permitted","input":32000}]},'
                          b'"type":"invalid_request_error","param":null,"code":null}')
# github.com/charmbracelet/crush/issues/1590
MISTRAL_MESSAGE_FIELD = (b'{"object":"error","message":{"detail":[{"type":"extra_forbidden","loc":["body",'
                         b'"messages",31,"assistant","reasoning_content"],"msg":"Extra inputs are not permitted",'
                         b'"input":"\\n"}]},"type":"invalid_request_error","param":null,"code":null}')
# github.com/Gitlawb/openclaude/issues/739 (the bare FastAPI shape)
MISTRAL_BARE = (b'{"detail":[{"type":"extra_forbidden","loc":["body","store"],"msg":"Extra inputs are not permitted",'
                b'"input":false},{"type":"extra_forbidden","loc":["body","max_completion_tokens"],'
                b'"msg":"Extra inputs are not permitted","input":8192}]}')


@pytest.mark.parametrize(("body", "field"), [
    (MISTRAL_STREAM_OPTIONS, "stream_options"), (MISTRAL_MAX_COMPLETION, "max_completion_tokens"),
    (MISTRAL_MESSAGE_FIELD, "messages[].reasoning_content"), (MISTRAL_BARE, "store"),
])
def test_mistral_extra_forbidden_is_not_servable_here(body: bytes, field: str) -> None:
    error = error_for_status(422, body, {}, profile("mistral"))
    assert isinstance(error, NotServable)
    assert error.feature == field
    assert "Extra inputs are not permitted" in error.message
    assert "{" not in error.message  # the reason, not a repr of the body


# --- Groq (OpenAI-shaped bodies)
# github.com/assafelovic/gpt-researcher/issues/985: one request larger than the whole minute's budget
GROQ_413_TPM = orjson.dumps({"error": {
    "message": "Request too large for model `llama-3.1-70b-versatile` in organization `org_01hw` on tokens per "
               "minute (TPM): Limit 6000, Requested 14368, please reduce your message size and try again. Visit "
               "https://console.groq.com/docs/rate-limits for more information.",
    "type": "tokens", "code": "rate_limit_exceeded"}})
# github.com/elizaOS/eliza/issues/4040: this minute's budget is spent
GROQ_429_TPM = orjson.dumps({"error": {
    "message": "Rate limit reached for model `llama-3.1-8b-instant` in organization `org_01j5` service tier "
               "`on_demand` on tokens per minute (TPM): Limit 6000, Used 5034, Requested 1443. Please try again "
               "in 4.77s. Need more tokens? Upgrade to Dev Tier today at https://console.groq.com/settings/billing",
    "type": "tokens", "code": "rate_limit_exceeded"}})
# github.com/continuedev/continue/issues/10920: the day's tokens are spent
GROQ_429_TPD = orjson.dumps({"error": {
    "message": "Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_01kj` service tier "
               "`on_demand` on tokens per day (TPD): Limit 100000, Used 97050, Requested 3619. Please try again in "
               "9m38.016s. Need more tokens? Upgrade to Dev Tier today at https://console.groq.com/settings/billing",
    "type": "tokens", "code": "rate_limit_exceeded"}})


def test_groq_request_over_the_minute_budget_is_not_servable_here() -> None:
    error = error_for_status(413, GROQ_413_TPM, {}, profile(headers="groq"))
    assert isinstance(error, NotServable) and error.feature == "tokens"


def test_groq_minute_quota_waits_what_the_body_says() -> None:
    error = error_for_status(429, GROQ_429_TPM, {"retry-after": "5"}, profile(headers="groq"))
    assert isinstance(error, RateLimited) and not error.daily
    assert error.retry_after_s == pytest.approx(5.0)  # the longest of Retry-After (5) and the body (4.77)


def test_groq_day_quota_is_parked_for_the_stated_wait() -> None:
    error = error_for_status(429, GROQ_429_TPD, {}, profile(headers="groq"))
    assert isinstance(error, RateLimited) and error.daily
    assert error.retry_after_s == pytest.approx(578.016)


def test_groq_429_headers_count_requests_per_day() -> None:
    # console.groq.com/docs/rate-limits: x-ratelimit-*-requests always refer to requests per day.
    headers = {"retry-after": "2", "x-ratelimit-limit-requests": "14400", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": "2m59.56s", "x-ratelimit-remaining-tokens": "17997",
               "x-ratelimit-reset-tokens": "7.66s"}
    error = error_for_status(429, _body("Rate limit reached", "rate_limit_exceeded"), headers, profile(headers="groq"))
    assert isinstance(error, RateLimited) and error.daily
    assert error.retry_after_s == pytest.approx(179.56)


# --- GitHub Models: a per-request cap of the free tier
# github.com/eslint/tsc-meetings/pull/593
GITHUB_413 = (b'{"error":{"code":"tokens_limit_reached","message":"Request body too large for gpt-4o model. '
              b'Max size: 8000 tokens.","details":"Request body too large for gpt-4o model. Max size: 8000 tokens."}}')


def test_github_models_token_cap_is_not_servable_here() -> None:
    error = error_for_status(413, GITHUB_413, {})
    assert isinstance(error, NotServable) and error.feature == "tokens"
    assert "Max size: 8000 tokens" in error.message


# --- OpenRouter
# github.com/Gitlawb/openclaude/issues/936 (reset: epoch milliseconds)
def openrouter_daily(reset_ms: int) -> bytes:
    return orjson.dumps({"error": {
        "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests "
                   "per day",
        "code": 429, "metadata": {"headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                                              "X-RateLimit-Reset": str(reset_ms)}}}})


# github.com/open-webui/computer/issues/293
OPENROUTER_UPSTREAM_429 = orjson.dumps({"error": {
    "message": "Provider returned error", "code": 429,
    "metadata": {"raw": "z-ai/glm-5.3-flash is temporarily rate-limited upstream. Please retry shortly, or add your "
                        "own key to accumulate your rate limits",
                 "provider_name": "BaseTen", "limit_source": "upstream_provider_shared_pool"}}})
# github.com/diegosouzapw/OmniRoute/issues/3044 (raw is the upstream's JSON, as a string)
OPENROUTER_RAW_400 = orjson.dumps({"error": {
    "message": "Provider returned error", "code": 400,
    "metadata": {"raw": '{"error":{"type":"invalid_request_error","code":"invalid_request_error","message":'
                        '"Model \'moonshotai/kimi-k2.6\' supports at most 1 image per prompt.","request_id":"req_1"}}',
                 "provider_name": "Crucible", "is_byok": False}}, "user_id": "user_1"})
# github.com/evalstate/fast-agent/issues/122
OPENROUTER_NO_TOOLS = (b'{"error": {"message": "No endpoints found that support tool use. To learn more about '
                       b'provider routing, visit: https://openrouter.ai/docs/provider-routing", "code": 404}}')
# github.com/ShamanicArts/Flow.Launcher.Plugin.AI-Assistant/issues/2
OPENROUTER_DATA_POLICY = (b'{"error": {"message": "No endpoints found matching your data policy (Free model '
                          b'publication). Configure: https://openrouter.ai/settings/privacy", "code": 404}}')
# github.com/astrio-labs/forall/issues/76
OPENROUTER_402 = (b'{"error":{"message":"This request requires more credits, or fewer max_tokens. You requested up '
                  b'to 64000 tokens, but can only afford 2666. To increase, visit https://openrouter.ai/settings/'
                  b'credits and upgrade to a paid account","code":402,"metadata":{"provider_name":null}},'
                  b'"user_id":"user_35t"}')


def test_openrouter_daily_cap_parks_until_the_stated_reset() -> None:
    reset_ms = int((time.time() + 5 * 3600) * 1000)
    error = error_for_status(429, openrouter_daily(reset_ms), {}, profile("openrouter", "openrouter"))
    assert isinstance(error, RateLimited) and error.daily and error.scope == "account"
    assert error.retry_after_s == pytest.approx(5 * 3600, abs=2)


def test_openrouter_daily_cap_without_reset_lapses_at_utc_midnight() -> None:
    body = b'{"error":{"message":"Rate limit exceeded: free-models-per-day.","code":429}}'
    error = error_for_status(429, body, {}, profile("openrouter", "openrouter"))
    assert isinstance(error, RateLimited) and error.daily
    assert error.retry_after_s == pytest.approx(seconds_until_daily_reset("utc_midnight"), abs=2)


def test_openrouter_upstream_429_names_its_provider_and_stays_on_that_model() -> None:
    error = error_for_status(429, OPENROUTER_UPSTREAM_429, {"retry-after": "3"}, profile("openrouter", "openrouter"))
    assert isinstance(error, RateLimited) and not error.daily and error.scope == "model"
    assert "BaseTen" in error.message and "temporarily rate-limited upstream" in error.message


def test_openrouter_metadata_raw_is_the_reason_shown() -> None:
    error = error_for_status(400, OPENROUTER_RAW_400, {}, profile("openrouter", "openrouter"))
    assert isinstance(error, RequestRejected)
    assert "supports at most 1 image per prompt" in error.message and "Crucible" in error.message


@pytest.mark.parametrize(("body", "feature"), [(OPENROUTER_NO_TOOLS, "tools"),
                                               (OPENROUTER_DATA_POLICY, "data_policy")])
def test_openrouter_no_endpoint_for_this_request_is_not_servable_here(body: bytes, feature: str) -> None:
    error = error_for_status(404, body, {}, profile("openrouter", "openrouter"))
    assert isinstance(error, NotServable) and error.feature == feature


def test_openrouter_out_of_credits_is_a_quota_without_reset() -> None:
    error = error_for_status(402, OPENROUTER_402, {}, profile("openrouter", "openrouter"))
    assert isinstance(error, RateLimited) and error.daily and error.status == 402
    assert error.retry_after_s is None


# --- Gemini's OpenAI endpoint: a JSON list, the wait only in the body
def gemini_429(quota_id: str, delay: str) -> bytes:
    # The shape of github.com/continuedev/continue/issues/9570 and google-gemini/gemini-cli#8437.
    return orjson.dumps([{"error": {
        "code": 429, "message": "You exceeded your current quota, please check your plan and billing details.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": quota_id, "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
            "quotaValue": "20"}]},
            {"@type": "type.googleapis.com/google.rpc.Help",
             "links": [{"description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]}}])


# github.com/musistudio/claude-code-router/issues/187, MinLL/SkyrimNet-GamePlugin#77
GEMINI_UNKNOWN_FIELD = orjson.dumps([{"error": {
    "code": 400, "message": 'Invalid JSON payload received. Unknown name "top_k": Cannot find field.',
    "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                               "fieldViolations": [{"description": "..."}]}]}}])
GEMINI_UNKNOWN_TOOL_KEY = orjson.dumps([{"error": {
    "code": 400, "message": "Invalid JSON payload received. Unknown name \"additionalProperties\" at "
                            "'tools[0].function_declarations[34].parameters.properties[6].value.items.any_of[0]': "
                            "Cannot find field.", "status": "INVALID_ARGUMENT"}}])


def test_gemini_minute_quota_waits_retry_delay_per_model() -> None:
    error = error_for_status(429, gemini_429("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "37s"), {},
                             profile("gemini", "none", "pacific_midnight"))
    assert isinstance(error, RateLimited) and not error.daily
    assert error.retry_after_s == pytest.approx(37.0) and error.scope == "model"
    assert "[" not in error.message and "RESOURCE_EXHAUSTED" not in error.message  # never a repr


def test_gemini_day_quota_lapses_at_midnight_pacific_whatever_retry_delay_says() -> None:
    error = error_for_status(429, gemini_429("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "57s"), {},
                             profile("gemini", "none", "pacific_midnight"))
    assert isinstance(error, RateLimited) and error.daily and error.scope == "model"
    assert error.retry_after_s == pytest.approx(seconds_until_daily_reset("pacific_midnight"), abs=2)


@pytest.mark.parametrize(("body", "field"), [(GEMINI_UNKNOWN_FIELD, "top_k"),
                                             (GEMINI_UNKNOWN_TOOL_KEY, "tools.schema")])
def test_gemini_unknown_field_is_not_servable_here(body: bytes, field: str) -> None:
    error = error_for_status(400, body, {}, profile("gemini"))
    assert isinstance(error, NotServable) and error.feature == field


# --- The rest of the taxonomy, provider-neutral
@pytest.mark.parametrize(("status", "body", "headers", "kind"), [
    (429, _body("slow down"), {"retry-after": "3"}, RateLimited),
    (401, _body("Invalid API key"), {}, UpstreamAuthFailed),
    # Gemini: an invalid key is a 400 INVALID_ARGUMENT with reason API_KEY_INVALID.
    (400, _body("API key not valid. Please pass a valid API key.", "API_KEY_INVALID"), {}, UpstreamAuthFailed),
    # OpenRouter: a moderation block is a 403, and is the request's fault, not our key's.
    (403, _body("Your input was flagged by moderation", "403"), {}, ContentRejected),
    (400, _body("Your request was rejected as a result of our safety system.", "content_policy_violation"), {},
     ContentRejected),
    (400, _body("This model's maximum context length is 8192 tokens.", "context_length_exceeded"), {},
     ContextTooLong),
    (404, _body("No endpoints found"), {}, ModelUnavailable),
    (400, _body("The model `x` has been decommissioned", "model_decommissioned"), {}, ModelUnavailable),
    (408, _body("Request timed out"), {}, UpstreamTimeout),
    (400, _body("temperature must be at most 2"), {}, RequestRejected),
    (400, _body("`logprobs` is not supported with this model"), {}, NotServable),
    (503, b"<html>overloaded</html>", {}, UpstreamServerError),
])
def test_error_mapping(status: int, body: bytes, headers: dict[str, str], kind: type[UpstreamError]) -> None:
    error = error_for_status(status, body, headers)
    assert type(error) is kind


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "1500"}) == pytest.approx(1.5)
    assert parse_retry_after({"Retry-After": "12"}) == 12
    assert parse_retry_after({}) is None


def test_secrets_in_upstream_messages_are_redacted() -> None:
    error = error_for_status(401, _body("bad key sk-abcdefghijklmnopqrstuvwxyz0123 for Bearer gsk_secret"), {})
    assert "sk-abcdef" not in error.message
    assert "gsk_secret" not in error.message


@pytest.mark.parametrize("body", [b"[1, 2", b"[]", b"[{}]", b'{"error": [1]}', b'"just a string"', b"null"])
def test_odd_bodies_never_leak_a_repr(body: bytes) -> None:
    for dialect in ("openai", "openrouter", "gemini", "mistral"):
        message = parse_error(body, dialect).message
        assert message and "{" not in message and "[{" not in message


@pytest.mark.parametrize(("chunk", "ok"), [
    ({"choices": [{"index": 0, "delta": {"content": "hi"}}]}, True),
    ({"choices": [], "usage": {"total_tokens": 3}}, True),
    ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]}, True),
    ({"choices": "nope"}, False),
    ({"choices": [{"index": "0", "delta": {}}]}, False),
    ({"choices": [{"index": 0, "delta": "text"}]}, False),
    ({"choices": [{"index": 0, "delta": {"content": 5}}]}, False),
    ({"choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": {"a": 1}}}]}}]}, False),
    ({"choices": [{"index": 0, "delta": {"tool_calls": ["x"]}}]}, False),
])
def test_chunk_shapes(chunk: dict, ok: bool) -> None:
    from router.providers.sse import well_formed

    assert well_formed(chunk) is ok


# --- Stated limits: the window a context refusal names, and the tokens it counted (routed by next)
@pytest.mark.parametrize(("status", "body", "errors", "limit", "requested"), [
    # vllm-project/vllm#20409 (OpenAI, Groq and OpenRouter word it the same)
    (400, _body("This model's maximum context length is 16384 tokens. However, you requested 19591 tokens (9591 in "
                "the messages, 10000 in the completion). Please reduce the length of the messages or completion.",
                "context_length_exceeded"), "openai", 16384, 19591),
    # dissorial/Chainlit-OpenAI-Functions#1
    (400, _body("This model's maximum context length is 4097 tokens. However, your messages resulted in 4238 tokens "
                "(4143 in the messages, 95 in the functions).", "context_length_exceeded"), "openai", 4097, 4238),
    # google-gemini/gemini-cli#6678: a JSON list
    (400, orjson.dumps([{"error": {"code": 400, "message": "The input token count (1200293) exceeds the maximum "
                                   "number of tokens allowed (1048576).", "status": "INVALID_ARGUMENT"}}]),
     "gemini", 1048576, 1200293),
    # cline/cline#5140 (Cerebras)
    (400, _body("Please reduce the length of the messages or completion. Current length is 42328 while limit is "
                "40000"), "openai", 40000, 42328),
    # anthropics/claude-code#408 (an Anthropic-style server behind an OpenAI-compatible front)
    (400, _body("input length and `max_tokens` exceed context limit: 189136 + 20000 > 204648, decrease input length "
                "or `max_tokens` and try again"), "openai", 204648, 189136),
    (400, _body("This model's maximum context length is 8192 tokens."), "openai", 8192, None),
])
def test_a_stated_window_is_read(status: int, body: bytes, errors: str, limit: int, requested: int | None) -> None:
    error = error_for_status(status, body, {}, profile(errors=errors))
    assert isinstance(error, ContextTooLong)
    assert (error.limit_tokens, error.requested_tokens) == (limit, requested)


def test_a_per_request_token_cap_states_its_limit() -> None:
    # cline/cline#995 (GitHub Models' free tier) and Groq's whole-minute overrun (continue#10218).
    github = error_for_status(413, _body("Request body too large for gpt-4o model. Max size: 8000 tokens.",
                                         "tokens_limit_reached"), {})
    assert isinstance(github, NotServable) and (github.feature, github.limit_tokens) == ("tokens", 8000)
    groq = error_for_status(413, _body("Request too large for model `llama-3.1-8b-instant` on tokens per minute (TPM): "
                                       "Limit 6000, Requested 14368, please reduce your message size and try again.",
                                       "rate_limit_exceeded"), {}, profile(headers="groq"))
    assert isinstance(groq, NotServable) and (groq.limit_tokens, groq.requested_tokens) == (6000, 14368)
