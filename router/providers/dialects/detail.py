"""The one shape every error dialect reads its bodies into."""

import re
from dataclasses import dataclass, field

_WAIT = re.compile(r"(?:try again|retry) in ((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)", re.IGNORECASE)
_PER_DAY = re.compile(r"per day|per-day|\(RPD\)|\(TPD\)|requests_per_day|perday", re.IGNORECASE)
# "Limit 6000, Requested 14368" (Groq's tokens-per-minute overrun)
_LIMIT_REQUESTED = re.compile(r"Limit (\d+), Requested (\d+)")
# A context window stated in words, as (pattern, group of the limit, group of the tokens asked
# for or 0). OpenAI, vLLM, Groq, OpenRouter: "This model's maximum context length is 16384 tokens.
# However, you requested 19591 tokens (9591 in the messages, 10000 in the completion)"
# (vllm-project/vllm#20409); Gemini: "The input token count (1200293) exceeds the maximum number
# of tokens allowed (1048576)" (google-gemini/gemini-cli#6678); Cerebras: "Please reduce the length
# of the messages or completion. Current length is 42328 while limit is 40000" (cline/cline#5140);
# Anthropic-style: "input length and `max_tokens` exceed context limit: 189136 + 20000 > 204648"
# (anthropics/claude-code#408); GitHub Models' 413: "Max size: 8000 tokens" (cline/cline#995).
_STATED_WINDOWS = (
    (re.compile(r"maximum context length is (\d+) tokens", re.IGNORECASE), 1, 0),
    (re.compile(r"input token count \((\d+)\) exceeds the maximum number of tokens allowed \((\d+)\)",
                re.IGNORECASE), 2, 1),
    (re.compile(r"current length is (\d+) while limit is (\d+)", re.IGNORECASE), 2, 1),
    (re.compile(r"exceed context limit: (\d+) \+ \d+ > (\d+)", re.IGNORECASE), 2, 1),
    (re.compile(r"max size: (\d+) tokens", re.IGNORECASE), 1, 0),
)
_REQUESTED = re.compile(r"(?:you requested|resulted in) (?:about )?(\d+) tokens", re.IGNORECASE)


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
    # A context window (or per-request token cap) the message states, and the tokens it counted
    # for this request when it says (router/failover.py routes the next attempt by them).
    stated_window: int | None = None
    stated_request: int | None = None


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
    if detail.stated_window is None:
        read_stated_window(detail, text)


def read_stated_window(detail: ErrorDetail, text: str) -> None:
    """Fill stated_window (and stated_request) from a message that states a context limit."""
    for pattern, limit_group, requested_group in _STATED_WINDOWS:
        found = pattern.search(text)
        if found:
            detail.stated_window = int(found.group(limit_group))
            if requested_group:
                detail.stated_request = int(found.group(requested_group))
            break
    if detail.stated_window is not None and detail.stated_request is None:
        requested = _REQUESTED.search(text)
        if requested:
            detail.stated_request = int(requested.group(1))
