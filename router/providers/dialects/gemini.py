"""Gemini's OpenAI-compatibility endpoint: google.rpc errors, usually wrapped in a JSON list.

[{"error": {"code": 429, "message": "...", "status": "RESOURCE_EXHAUSTED", "details": [
  {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId":
   "GenerateRequestsPerDayPerProjectPerModel-FreeTier", ...}]},
  {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "57s"}]}}]

The wait is only in the body (RetryInfo.retryDelay); limits apply per project and per model,
and a requests-per-day quota resets at midnight Pacific time whatever retryDelay says
(ai.google.dev/gemini-api/docs/rate-limits). A field it does not know is a 400
INVALID_ARGUMENT "Invalid JSON payload received. Unknown name \"top_k\": Cannot find field."
"""

import re
from typing import Any

from router.providers.dialects.detail import ErrorDetail, read_message_hints
from router.providers.limits import parse_reset_s
from router.providers.sanitize import sanitize

_UNKNOWN_NAME = re.compile(r'Unknown name \\?"([A-Za-z_$][\w$]*)\\?"(?: at \'([\w.\[\]]+)\')?')


def parse(data: Any) -> ErrorDetail:
    """A google.rpc error body, whether a list of one error or the error object itself."""
    if isinstance(data, list):
        data = next((item for item in data if isinstance(item, dict)), {})
    error = data.get("error", data) if isinstance(data, dict) else {}
    if not isinstance(error, dict):
        return ErrorDetail()
    raw_message = error.get("message")
    message = raw_message if isinstance(raw_message, str) else ""
    detail = ErrorDetail(message=sanitize(message), code=str(error.get("status") or error.get("code") or ""))
    for item in error.get("details") or []:
        if not isinstance(item, dict):
            continue
        kind = str(item.get("@type", ""))
        if kind.endswith("google.rpc.RetryInfo") and isinstance(item.get("retryDelay"), str):
            detail.retry_after_s = parse_reset_s(item["retryDelay"])
        elif kind.endswith("google.rpc.QuotaFailure"):
            _quota_failure(detail, item.get("violations"))
    unknown = _UNKNOWN_NAME.search(message)
    if unknown and not unknown.group(2):  # a top-level field, not one inside tools or contents
        detail.refused_field = unknown.group(1)
    elif unknown:
        # A JSON-schema key inside a tool ("additionalProperties" at 'tools[0]...'): this request's
        # schema, not tools as such — another request's tools may well pass.
        detail.refused_field = f"{(unknown.group(2) or '').split('[')[0] or 'request'}.schema"
    read_message_hints(detail, message)
    return detail


def _quota_failure(detail: ErrorDetail, violations: Any) -> None:
    for violation in violations if isinstance(violations, list) else []:
        quota_id = str(violation.get("quotaId", "")) if isinstance(violation, dict) else ""
        if "PerModel" in quota_id:
            detail.scope = "model"
        if "PerDay" in quota_id:
            detail.daily = detail.daily_boundary = True
