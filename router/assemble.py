"""Build a whole `chat.completion` from streamed chunks (non-streaming requests stream upstream too,
so stalls are detected and a cut answer is retried instead of returned)."""

from typing import Any


class CompletionAssembler:
    """Accumulates chat.completion.chunk objects of one attempt."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new attempt starts from scratch)."""
        self._choices: dict[int, dict[str, Any]] = {}
        self._meta: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None

    async def add(self, chunk: dict[str, Any]) -> None:
        """Fold one chunk in: strings concatenate, tool calls merge by index, the rest is replaced."""
        for name in ("id", "created", "system_fingerprint", "service_tier"):
            if chunk.get(name) is not None:
                self._meta.setdefault(name, chunk[name])
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            index = int(choice.get("index") or 0)
            target = self._choices.setdefault(index, {"index": index, "message": {"role": "assistant"},
                                                      "logprobs": None, "finish_reason": None})
            _merge_delta(target["message"], choice.get("delta") or {})
            if choice.get("finish_reason"):
                target["finish_reason"] = choice["finish_reason"]
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                merged = target["logprobs"] or {"content": []}
                merged["content"] = [*merged["content"], *logprobs["content"]]
                target["logprobs"] = merged

    def result(self, model: str) -> dict[str, Any]:
        """The assembled completion, named after the model that served it."""
        choices = [self._choices[i] for i in sorted(self._choices)]
        for choice in choices:
            message = choice["message"]
            if message.get("tool_calls"):
                message["tool_calls"] = [message["tool_calls"][i] for i in sorted(message["tool_calls"])]
                message["content"] = message.get("content") or None
            else:
                message.setdefault("content", "")
        completion: dict[str, Any] = {"id": self._meta.get("id", "chatcmpl-freeference"),
                                      "object": "chat.completion", "created": self._meta.get("created", 0),
                                      "model": model, "choices": choices, "usage": self.usage}
        for name in ("system_fingerprint", "service_tier"):
            if name in self._meta:
                completion[name] = self._meta[name]
        return completion


def _merge_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    for name, value in delta.items():
        if name == "tool_calls" and isinstance(value, list):
            calls: dict[int, dict[str, Any]] = message.setdefault("tool_calls", {})
            for piece in value:
                _merge_tool_call(calls, piece)
        elif name == "role":
            message["role"] = value or message.get("role", "assistant")
        elif isinstance(value, str):
            message[name] = (message.get(name) or "") + value
        elif value is not None:
            message[name] = value


def _merge_tool_call(calls: dict[int, dict[str, Any]], piece: dict[str, Any]) -> None:
    index = int(piece.get("index") or 0)
    call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    if piece.get("id"):
        call["id"] = piece["id"]
    if piece.get("type"):
        call["type"] = piece["type"]
    function = piece.get("function") or {}
    call["function"]["name"] += function.get("name") or ""
    call["function"]["arguments"] += function.get("arguments") or ""
