"""Answer shapes of OpenAI's Responses API: a chat completion's message as `response` output items.

Both sides build them: the API for live /v1/responses answers (api/dialects/responses_out.py),
the workers for batch lines of a /v1/responses batch, whose output file holds `response`
objects as OpenAI's does (fill_response). Pure functions; workers/protocol.py re-exports them.
"""

import time
import uuid
from typing import Any


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: `resp_…`, `msg_…`, `fc_…`, `rs_…`."""
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_of(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat usage in the Responses shape."""
    if not chat_usage:
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    cached = int((chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion}


def status_of(finish_reason: str | None) -> tuple[str, str | None]:
    """(status, incomplete reason) for a chat finish_reason."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    if finish_reason == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


def reasoning_text(holder: dict[str, Any]) -> str:
    value = holder.get("reasoning_content") or holder.get("reasoning")
    return value if isinstance(value, str) else ""


def output_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The output items of one whole chat message."""
    items: list[dict[str, Any]] = []
    reasoning = reasoning_text(message)
    if reasoning:
        items.append(reasoning_item(new_id("rs"), reasoning))
    parts: list[dict[str, Any]] = []
    if isinstance(message.get("content"), str) and message["content"]:
        parts.append(text_part(message["content"]))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        parts.append({"type": "refusal", "refusal": message["refusal"]})
    if parts:
        items.append(message_item(new_id("msg"), "completed", parts))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        items.append(call_item(new_id("fc"), call.get("id") or new_id("call"), function.get("name", ""),
                                function.get("arguments", ""), "completed"))
    return items


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def fill_response(template: dict[str, Any], completion: dict[str, Any], model: str) -> dict[str, Any]:
    """The `response` object of a batch line: its request's echo (`template`, made when the batch
    was validated) with what the answer says (a fresh id, status, output items, usage, model)."""
    choice = (completion.get("choices") or [{}])[0]
    status, reason = status_of(choice.get("finish_reason"))
    return {**template, "id": new_id("resp"), "created_at": int(time.time()), "status": status,
            "incomplete_details": {"reason": reason} if reason else None, "model": model,
            "output": output_items(choice.get("message") or {}), "usage": usage_of(completion.get("usage"))}
