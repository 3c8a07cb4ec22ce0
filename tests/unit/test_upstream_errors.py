"""How upstream error responses map to typed failures (real provider error shapes)."""

import orjson
import pytest

from router.errors import (
    ContentRejected,
    ContextTooLong,
    ModelUnavailable,
    RateLimited,
    RequestRejected,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamServerError,
    UpstreamTimeout,
)
from router.providers.openai_compat import error_for_status


def _body(message: str, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "code": code}})


@pytest.mark.parametrize(("status", "body", "headers", "kind"), [
    (429, _body("slow down"), {"retry-after": "3"}, RateLimited),
    # Groq reports a tokens-per-minute overrun as 413 with code rate_limit_exceeded.
    (413, _body("Request too large on tokens per minute (TPM)", "rate_limit_exceeded"), {}, RateLimited),
    (401, _body("Invalid API key"), {}, UpstreamAuthFailed),
    (402, _body("Insufficient credits"), {}, UpstreamAuthFailed),
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
    (503, b"<html>overloaded</html>", {}, UpstreamServerError),
])
def test_error_mapping(status: int, body: bytes, headers: dict[str, str], kind: type[UpstreamError]) -> None:
    error = error_for_status(status, body, headers)
    assert type(error) is kind


def test_retry_after_is_parsed() -> None:
    error = error_for_status(429, _body("later"), {"retry-after-ms": "1500"})
    assert isinstance(error, RateLimited)
    assert error.retry_after_s == pytest.approx(1.5)


def test_secrets_in_upstream_messages_are_redacted() -> None:
    error = error_for_status(401, _body("bad key sk-abcdefghijklmnopqrstuvwxyz0123 for Bearer gsk_secret"), {})
    assert "sk-abcdef" not in error.message
    assert "gsk_secret" not in error.message


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
    from router.providers.openai_compat import _well_formed

    assert _well_formed(chunk) is ok
