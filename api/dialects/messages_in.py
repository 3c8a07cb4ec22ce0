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

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.errors import invalid_request
from api.schemas import RouteHint, deepest, located_param, parse_json_object


class _Shape(BaseModel):
    # Fields beyond these (cache_control, citations …) are accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Shape):
    type: Literal["text"]
    text: str


class Base64Source(_Shape):
    type: Literal["base64"]
    media_type: str
    data: str


class UrlSource(_Shape):
    type: Literal["url"]
    url: str


class ImageBlock(_Shape):
    type: Literal["image"]
    source: Annotated[Base64Source | UrlSource, Field(discriminator="type")]


class ToolUseBlock(_Shape):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Shape):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Shape):
    type: Literal["thinking"]
    thinking: str


class RedactedThinkingBlock(_Shape):
    type: Literal["redacted_thinking"]
    data: str


UserBlock = Annotated[TextBlock | ImageBlock | ToolResultBlock, Field(discriminator="type")]
AssistantBlock = Annotated[TextBlock | ToolUseBlock | ThinkingBlock | RedactedThinkingBlock,
                           Field(discriminator="type")]


class UserTurn(_Shape):
    role: Literal["user"]
    content: str | Annotated[list[UserBlock], Field(min_length=1)]


class AssistantTurn(_Shape):
    role: Literal["assistant"]
    content: str | Annotated[list[AssistantBlock], Field(min_length=1)]


class ClientTool(_Shape):
    """A tool the client runs (Anthropic's own server tools are not served here)."""

    type: Literal["custom"] | None = None
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Shape):
    type: Literal["auto", "any", "none"]
    disable_parallel_tool_use: bool | None = None


class NamedToolChoice(_Shape):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class RequestMetadata(_Shape):
    user_id: str | None = None


class MessagesRequestBase(_Shape):
    model: str = Field(min_length=1)
    messages: Annotated[list[Annotated[UserTurn | AssistantTurn, Field(discriminator="role")]], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: RequestMetadata | None = None
    stream: bool = False
    tools: list[ClientTool] | None = None
    tool_choice: Annotated[ToolChoice | NamedToolChoice, Field(discriminator="type")] | None = None
    # Gateway extensions, as on chat: ordered fallbacks and an intent override.
    models: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
    route: RouteHint | None = None


class MessagesRequest(MessagesRequestBase):
    """A Messages request: what the gateway serves (other fields are accepted and ignored)."""

    max_tokens: int = Field(ge=1)  # required, as Anthropic requires it


class CountTokensRequest(MessagesRequestBase):
    """A count_tokens request: a Messages request without max_tokens."""

    max_tokens: int | None = Field(default=None, ge=1)


def parse_messages_request(raw: bytes, max_depth: int, need_max_tokens: bool) -> tuple[MessagesRequestBase,
                                                                                       dict[str, Any]]:
    """The validated request and its JSON (400 naming the problem, in Anthropic's words)."""
    data = parse_json_object(raw, max_depth)
    model = MessagesRequest if need_max_tokens else CountTokensRequest
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        err = deepest(exc)
        param = located_param(tuple(err["loc"]), data)
        raise invalid_request(f"{param}: {err['msg']}" if param else str(err["msg"]), param=param) from None
    return request, data


def to_chat(request: MessagesRequestBase, data: dict[str, Any]) -> dict[str, Any]:
    """The chat completion body for this request (`data`: its JSON, validated already)."""
    messages: list[dict[str, Any]] = []
    system = _system_text(data.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for index, message in enumerate(data["messages"]):
        _add_message(messages, message, f"messages.{index}")
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    max_tokens = getattr(request, "max_tokens", None)
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if request.tools:
        body["tools"] = [_tool(tool) for tool in request.tools]
    if request.tool_choice is not None:
        _apply_tool_choice(body, request.tool_choice)
    if request.stop_sequences:
        body["stop"] = request.stop_sequences
    for name in ("temperature", "top_p", "top_k", "models"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.route is not None:
        body["route"] = request.route.model_dump(exclude_none=True)
    if request.metadata is not None and request.metadata.user_id is not None:
        body["user"] = request.metadata.user_id
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


def _tool(tool: ClientTool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _apply_tool_choice(body: dict[str, Any], choice: ToolChoice | NamedToolChoice) -> None:
    if isinstance(choice, NamedToolChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use and body.get("tools"):
        body["parallel_tool_calls"] = False
