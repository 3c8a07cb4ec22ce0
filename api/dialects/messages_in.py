"""Anthropic Messages API requests → chat completion requests.

- `system` (a string or text blocks) → a leading `system` message;
- `text` blocks → text; `image` blocks (base64 or URL source) → `image_url` parts (base64 as a
  data URL);
- an assistant turn's `tool_use` blocks → its `tool_calls` (input serialized as the arguments);
  `thinking` blocks are dropped (a model's own thinking is not sent back upstream);
- a user turn's `tool_result` blocks → `tool` messages, first, as chat wants them right after
  the assistant turn that called (an error result is prefixed "Error: "; images in a result
  follow in a user message);
- `tools` (`name`, `description`, `input_schema`) → function tools; `tool_choice` auto / any /
  tool / none → auto / required / a function / none; `disable_parallel_tool_use` →
  `parallel_tool_calls: false`;
- `max_tokens` (required, as Anthropic requires it), `stop_sequences` → `stop`, `temperature`,
  `top_p`, `top_k`, `metadata.user_id` → `user`.

Source of the request shape: https://docs.anthropic.com/en/api/messages. Server tools (web
search, code execution, computer use …), documents and other block types Anthropic runs itself
are refused with a 400 that names them.
"""

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.errors import invalid_request
from api.schemas import parse_json_object


class MessagesRequest(BaseModel):
    """The fields of a Messages request the gateway reads (others, e.g. cache_control, are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # required on /v1/messages, not on count_tokens
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    # Gateway extensions, as on chat: ordered fallbacks and an intent override.
    models: list[str] | None = None
    route: dict[str, Any] | None = None


def parse_messages_request(raw: bytes, max_depth: int, need_max_tokens: bool) -> MessagesRequest:
    """The validated request (400 naming the problem)."""
    data = parse_json_object(raw, max_depth)
    try:
        request = MessagesRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise invalid_request(f"{param}: {err['msg']}", param=param) from None
    if need_max_tokens and request.max_tokens is None:
        raise invalid_request("max_tokens: Field required", param="max_tokens")
    return request


def to_chat(request: MessagesRequest) -> dict[str, Any]:
    """The chat completion body for this request."""
    messages: list[dict[str, Any]] = []
    system = _system_text(request.system)
    if system:
        messages.append({"role": "system", "content": system})
    for index, message in enumerate(request.messages):
        _add_message(messages, message, f"messages.{index}")
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.tools:
        body["tools"] = [_tool(tool, f"tools.{i}") for i, tool in enumerate(request.tools)]
    if request.tool_choice is not None:
        _apply_tool_choice(body, request.tool_choice)
    if request.stop_sequences:
        body["stop"] = request.stop_sequences
    for name in ("temperature", "top_p", "top_k", "models", "route"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    user = (request.metadata or {}).get("user_id")
    if isinstance(user, str):
        body["user"] = user
    if request.stream:
        body["stream"] = True
    return body


def _system_text(system: str | list[dict[str, Any]] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "\n\n".join(_block_text(block, "system") for block in system)


def _block_text(block: Any, param: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise invalid_request("Expected a text block.", param=param)
    text: str = block["text"]
    return text


def _add_message(messages: list[dict[str, Any]], message: Any, param: str) -> None:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise invalid_request("Each message needs a role of 'user' or 'assistant'.", param=f"{param}.role")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        messages.append({"role": role, "content": content})
        return
    if not isinstance(content, list):
        raise invalid_request("content must be a string or a list of content blocks.", param=f"{param}.content")
    if role == "assistant":
        messages.append(_assistant_turn(content, f"{param}.content"))
    else:
        messages.extend(_user_turn(content, f"{param}.content"))


def _assistant_turn(blocks: list[Any], param: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_block_text(block, f"{param}.{index}"))
        elif kind == "tool_use":
            calls.append({"id": str(block.get("id", "")), "type": "function",
                          "function": {"name": str(block.get("name", "")),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise invalid_request(f"Content blocks of type {kind!r} are not supported in assistant turns.",
                                  param=f"{param}.{index}.type")
    turn: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        turn["tool_calls"] = calls
    return turn


def _user_turn(blocks: list[Any], param: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        where = f"{param}.{index}"
        if kind == "text":
            parts.append({"type": "text", "text": _block_text(block, where)})
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "tool_result":
            text, images = _tool_result(block, where)
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text})
            parts.extend(images)
        else:
            raise invalid_request(f"Content blocks of type {kind!r} are not supported.", param=f"{where}.type")
    if parts:
        results.append({"role": "user", "content": parts})
    return results


def _image(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source") or {}
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        url = f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise invalid_request("An image needs a base64 or url source.", param=f"{param}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(block: dict[str, Any], param: str) -> tuple[str, list[dict[str, Any]]]:
    content = block.get("content")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(_block_text(part, f"{param}.content.{index}"))
            elif kind == "image":
                images.append(_image(part, f"{param}.content.{index}"))
            else:
                raise invalid_request(f"tool_result content of type {kind!r} is not supported.",
                                      param=f"{param}.content.{index}.type")
    text = "".join(texts)
    return (f"Error: {text}" if block.get("is_error") else text), images


def _tool(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise invalid_request(f"Tools of type {kind!r} are not supported; only client tools with an input_schema "
                              "are.", param=param)
    if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
        raise invalid_request("A tool needs a 'name' and an 'input_schema'.", param=param)
    function = {"name": tool["name"], "parameters": tool["input_schema"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _apply_tool_choice(body: dict[str, Any], choice: dict[str, Any]) -> None:
    kind = choice.get("type")
    if kind == "auto":
        body["tool_choice"] = "auto"
    elif kind == "any":
        body["tool_choice"] = "required"
    elif kind == "none":
        body["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise invalid_request("tool_choice.type must be auto, any, tool (with a name) or none.",
                              param="tool_choice.type")
    if choice.get("disable_parallel_tool_use") and body.get("tools"):
        body["parallel_tool_calls"] = False
