"""Mistral's error shape: a FastAPI/pydantic validation list, sometimes nested in a message.

422 {"object": "error", "message": {"detail": [{"type": "extra_forbidden", "loc": ["body",
"stream_options", "include_usage"], "msg": "Extra inputs are not permitted", ...}]}, "type":
"invalid_request_error", "param": null, "code": null} (public reports in docs/providers.md);
also {"detail": [...]} bare, and {"object": "error", "message": "<text>", ...} for the rest.
"""

from typing import Any

from router.providers.dialects import openai
from router.providers.dialects.detail import ErrorDetail, read_message_hints
from router.providers.sanitize import sanitize


def parse(data: Any) -> ErrorDetail:
    """A Mistral error body; an extra_forbidden names the refused field."""
    if not isinstance(data, dict):
        return ErrorDetail()
    message = data.get("message")
    problems = data.get("detail")
    if isinstance(message, dict):
        problems = message.get("detail", problems)
    if isinstance(message, str) and message.lstrip().startswith("{"):
        return openai.parse(data)  # an older shape: the validation error as JSON text
    if not isinstance(problems, list):
        detail = openai.parse(data) if "error" in data else ErrorDetail(message=sanitize(str(message or "")))
        read_message_hints(detail, detail.message)
        return detail
    texts: list[str] = []
    detail = ErrorDetail(code=str(data.get("type") or data.get("code") or ""))
    for problem in problems:
        if not isinstance(problem, dict):
            continue
        loc = [str(p) for p in problem.get("loc") or [] if not isinstance(p, int)]
        path = ".".join(p for p in loc if p != "body")
        texts.append(f"{path}: {problem.get('msg', '')}")
        if problem.get("type") == "extra_forbidden" and detail.refused_field is None and len(loc) > 1:
            detail.refused_field = f"messages[].{loc[-1]}" if loc[1] == "messages" else loc[1]
            detail.code = "extra_forbidden"
    detail.message = sanitize("; ".join(texts))
    return detail
