"""Token counts for answers whose provider sent no usage (it ignored stream_options, or has none).

An estimate, not a tokenizer's count: about four characters a token (OpenAI's rule of thumb for
English), plus a few tokens of framing per message. Good enough for the caller's limits and
usage accounting, which would otherwise see nothing; the usage object says `"estimated": true`
and the worker logs it (docs/providers.md).
"""

from typing import Any

import orjson

_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4  # role and separators around each message


def _tokens(chars: int) -> int:
    return -(-chars // _CHARS_PER_TOKEN)  # ceiling


def prompt_tokens(body: dict[str, Any]) -> int:
    """The request's prompt (messages, tools), estimated."""
    messages = body.get("messages") or []
    chars = sum(len(orjson.dumps(m.get("content"))) for m in messages if isinstance(m, dict))
    tools = len(orjson.dumps(body["tools"])) if body.get("tools") else 0
    return _tokens(chars + tools) + _TOKENS_PER_MESSAGE * len(messages)


def estimated_usage(body: dict[str, Any], completion_chars: int) -> dict[str, Any]:
    """An OpenAI usage object for this request and an answer of `completion_chars` characters."""
    prompt = prompt_tokens(body)
    completion = _tokens(completion_chars)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "estimated": True}


def completion_chars(completion: dict[str, Any]) -> int:
    """Characters of every choice's text, reasoning and tool-call arguments in a whole completion."""
    total = 0
    for choice in completion.get("choices") or ():
        message = choice.get("message") or {}
        for name in ("content", "reasoning", "reasoning_content", "refusal"):
            if isinstance(message.get(name), str):
                total += len(message[name])
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            total += len(function.get("arguments") or "") + len(function.get("name") or "")
    return total
