"""Scrub upstream text before it reaches a caller or a log line."""

import re

# Bearer tokens and the key shapes of the providers we ship (OpenAI-style sk-, Groq gsk_,
# Google AIza, GitHub ghp_/github_pat_, our own ff-), plus long opaque secrets.
_SECRET = re.compile(
    r"(Bearer\s+\S+|sk-[A-Za-z0-9_-]{8,}|gsk_[A-Za-z0-9]{8,}|AIza[0-9A-Za-z_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|ff-[A-Za-z0-9_-]{16,}|[A-Za-z0-9_-]{40,})"
)
MAX_MESSAGE_CHARS = 300


def sanitize(text: str) -> str:
    """Redact anything shaped like a credential and bound the length."""
    cleaned = _SECRET.sub("[redacted]", text.replace("\n", " ").strip())
    return cleaned[:MAX_MESSAGE_CHARS]
