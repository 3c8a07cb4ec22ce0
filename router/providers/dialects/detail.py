"""The one shape every error dialect reads its bodies into."""

import re
from dataclasses import dataclass, field

_WAIT = re.compile(r"(?:try again|retry) in ((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)", re.IGNORECASE)
_PER_DAY = re.compile(r"per day|per-day|\(RPD\)|\(TPD\)|requests_per_day|perday", re.IGNORECASE)
# "Limit 6000, Requested 14368" (Groq's tokens-per-minute overrun)
_LIMIT_REQUESTED = re.compile(r"Limit (\d+), Requested (\d+)")


@dataclass
class ErrorDetail:
    """What an upstream error body says, whatever its dialect."""

    message: str = ""  # sanitized and bounded: safe to show a caller and to log
    code: str = ""  # the provider's code or status string ("rate_limit_exceeded", "RESOURCE_EXHAUSTED")
    retry_after_s: float | None = None  # a wait stated in the body (Gemini RetryInfo, "try again in 4.77s")
    daily: bool = False  # the body says a per-day (or otherwise long) cap was hit
    # The cap is a day's and resets at the profile's daily boundary, whatever short wait the body states.
    daily_boundary: bool = False
    scope: str | None = None  # "model" when the body says the limit is per model
    headers: dict[str, str] = field(default_factory=dict)  # rate-limit headers carried in the body
    refused_field: str | None = None  # a request field the provider named as unknown / not permitted
    # (limit, requested) tokens when a single request is over a per-request or per-minute cap.
    token_cap: tuple[int, int] | None = None


def read_message_hints(detail: ErrorDetail, text: str) -> None:
    """Fill what an error message states in words (OpenAI-compatible servers, Groq's quotas)."""
    from router.providers.limits import parse_reset_s

    wait = _WAIT.search(text)
    if wait and detail.retry_after_s is None:
        detail.retry_after_s = parse_reset_s(wait.group(1))
    if _PER_DAY.search(text):
        detail.daily = True
    capped = _LIMIT_REQUESTED.search(text)
    if capped and detail.token_cap is None:
        detail.token_cap = (int(capped.group(1)), int(capped.group(2)))
