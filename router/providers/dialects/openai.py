"""OpenAI's error shape, also spoken by Groq, Cerebras, Cohere's compatibility API, GitHub Models,
Ollama and vLLM: {"error": {"message", "type", "param", "code"}}.

Examples (docs/providers.md): Groq 413 {"error": {"message": "Request too large for model ... on
tokens per minute (TPM): Limit 6000, Requested 14368 ...", "type": "tokens", "code":
"rate_limit_exceeded"}}; GitHub Models 413 {"error": {"code": "tokens_limit_reached", "message":
"Request body too large for gpt-4o model. Max size: 8000 tokens.", "details": "..."}}.
"""

from typing import Any

from router.providers.dialects.detail import ErrorDetail, read_message_hints
from router.providers.sanitize import sanitize


def parse(data: Any) -> ErrorDetail:
    """An OpenAI-shaped error body (or a bare {"message"} / {"detail"} one)."""
    error = data.get("error", data) if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return ErrorDetail()
    raw_message = error.get("message") or error.get("detail")
    message = raw_message if isinstance(raw_message, str) else ""
    code = error.get("code") if error.get("code") is not None else error.get("type")
    detail = ErrorDetail(message=sanitize(message), code=str(code) if isinstance(code, str | int) else "")
    param = error.get("param")
    if isinstance(param, str) and ("unsupported" in message.lower() or "not supported" in message.lower()):
        detail.refused_field = param
    read_message_hints(detail, message)
    return detail
