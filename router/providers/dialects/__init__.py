"""Error bodies in each provider's dialect, read into one ErrorDetail (router/providers/classify.py decides).

One small module per dialect; the provider profile's `errors` names which one reads its
bodies. A body no dialect understands still yields its (sanitized) text.
"""

from collections.abc import Callable
from typing import Any

import orjson

from router.providers.dialects import gemini, mistral, openai, openrouter
from router.providers.dialects.detail import ErrorDetail
from router.providers.sanitize import sanitize

__all__ = ["ErrorDetail", "parse_error"]

_DIALECTS: dict[str, Callable[[Any], ErrorDetail]] = {
    "openai": openai.parse,
    "openrouter": openrouter.parse,
    "gemini": gemini.parse,
    "mistral": mistral.parse,
}


def parse_error(body: bytes, dialect: str) -> ErrorDetail:
    """What an error body says, read in `dialect` (falling back to the OpenAI shape, then raw text)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ErrorDetail(message=sanitize(body.decode("utf-8", "replace")) or "no error body")
    detail = _DIALECTS.get(dialect, openai.parse)(data)
    if not detail.message:
        detail.message = sanitize(_text(data)) or "no error message"
    return detail


def _text(data: Any) -> str:
    """Some text from an unknown shape, never a Python repr."""
    if isinstance(data, str):
        return data
    if isinstance(data, list):
        return " ".join(_text(item) for item in data[:3])
    if isinstance(data, dict):
        for name in ("message", "detail", "error", "msg"):
            if name in data:
                return _text(data[name])
        return ""
    return ""
