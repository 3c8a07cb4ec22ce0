"""OpenAI Responses API requests → chat completion requests.

A Responses request carries its conversation as a list of items (messages with typed parts,
function calls, function-call outputs); chat carries messages with tool calls. The mapping:

- `instructions` → a leading `system` message;
- message items (`user`, `system`, `developer` → `system`, which every provider takes,
  `assistant`) → messages; `input_text` / `output_text` parts → text parts, `input_image`
  (`image_url`) → `image_url` parts;
- `function_call` items → an assistant message with `tool_calls` (consecutive ones: one turn);
  `function_call_output` → a `tool` message; `reasoning` items are dropped (a model's own
  thinking is not sent back upstream);
- function tools `{type, name, parameters}` → `{type: function, function: {...}}`;
  `text.format` json_object / json_schema → `response_format`; `max_output_tokens` → `max_tokens`.

Anything the chat path cannot carry (built-in tools, file inputs, background mode, item
references, stored prompts) is refused with a 400 that names it, never silently dropped.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from api.errors import OpenAIError, invalid_request
from api.schemas import RouteHint, deepest, located_param, parse_json_object

_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


class _Shape(BaseModel):
    # Fields beyond these (ids, statuses, annotations …) are accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class InputText(_Shape):
    type: Literal["input_text"]
    text: str


class OutputText(_Shape):
    type: Literal["output_text"]
    text: str


class InputImage(_Shape):
    type: Literal["input_image"]
    image_url: str
    detail: Literal["low", "high", "auto"] | None = None


class RefusalPart(_Shape):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[InputText | OutputText | InputImage, Field(discriminator="type")]
TextPart = Annotated[InputText | OutputText | RefusalPart, Field(discriminator="type")]


class UserMessageItem(_Shape):
    type: Literal["message"] = "message"
    role: Literal["user"]
    content: str | Annotated[list[UserPart], Field(min_length=1)]


class TextMessageItem(_Shape):
    """System, developer and assistant turns carry text (images go in user turns)."""

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]


MessageItem = Annotated[UserMessageItem | TextMessageItem, Field(discriminator="role")]


class FunctionCallItem(_Shape):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Shape):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]


class ReasoningItem(_Shape):
    type: Literal["reasoning"]


def _item_kind(value: Any) -> str | None:
    # An item without a type is a message (OpenAI's "easy input message").
    if isinstance(value, dict):
        return str(value.get("type", "message"))
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind)]


class FunctionTool(_Shape):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Shape):
    type: Literal["function"]
    name: str


class PlainText(_Shape):
    type: Literal["text"]


class JsonObject(_Shape):
    type: Literal["json_object"]


class JsonSchema(_Shape):
    type: Literal["json_schema"]
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Shape):
    format: Annotated[PlainText | JsonObject | JsonSchema, Field(discriminator="type")] | None = None


class ResponsesRequest(_Shape):
    """A Responses request: what the gateway serves (other fields are accepted and ignored)."""

    input: str | Annotated[list[InputItem], Field(min_length=1)]
    model: str | None = None
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    parallel_tool_calls: bool | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16)
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    reasoning: dict[str, Any] | None = None
    user: str | None = None
    # Not served here: background runs, stored prompts and conversation objects (None only).
    background: Literal[False] | None = None
    prompt: None = None
    conversation: None = None
    # Gateway extensions, as on chat: ordered fallbacks and an intent override.
    models: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
    route: RouteHint | None = None


def parse_responses_request(raw: bytes, max_depth: int) -> tuple[ResponsesRequest, dict[str, Any]]:
    """The validated request and its JSON (400 naming the problem)."""
    data = parse_json_object(raw, max_depth)
    try:
        request = ResponsesRequest.model_validate(data)
    except ValidationError as exc:
        err = deepest(exc)
        param = located_param(tuple(err["loc"]), data)
        raise invalid_request(f"Invalid value for '{param}': {err['msg']}.", param=param) from None
    return request, data


def input_items(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's input items as sent (a string is one user message); validated already."""
    given = data["input"]
    if isinstance(given, str):
        return [{"type": "message", "role": "user", "content": given}]
    return [item if "type" in item else {"type": "message", **item} for item in given]


def to_chat(request: ResponsesRequest, conversation: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion body for this request, `conversation` being every input item in order."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    for index, item in enumerate(conversation):
        _add_item(messages, item, f"input[{index}]")
    if not messages:
        raise OpenAIError(400, "'input' must contain at least one message (reasoning items alone are no request).",
                          code="no_messages", param="input")
    body: dict[str, Any] = {"messages": messages}
    if request.model is not None:
        body["model"] = request.model
    if request.tools:
        body["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                         for tool in request.tools]
    if isinstance(request.tool_choice, FunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.name}}
    elif request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    fmt = request.text.format if request.text else None
    if isinstance(fmt, JsonObject):
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, JsonSchema):
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": fmt.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)}
    for source, target in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                           ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user"),
                           ("models", "models")):
        value = getattr(request, source)
        if value is not None:
            body[target] = value
    if request.route is not None:
        body["route"] = request.route.model_dump(exclude_none=True)
    effort = (request.reasoning or {}).get("effort")
    if isinstance(effort, str):
        body["reasoning_effort"] = effort
    if request.stream:
        body["stream"] = True
    return body


def _add_item(messages: list[dict[str, Any]], item: Any, param: str) -> None:
    if not isinstance(item, dict):
        raise invalid_request("Each input item must be an object.", param=param)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = _ROLES.get(str(item.get("role")))
        if role is None:
            raise invalid_request(f"Unsupported role {item.get('role')!r}.", param=f"{param}.role")
        messages.append({"role": role, "content": _content(item.get("content"), role, f"{param}.content")})
    elif kind == "function_call":
        call = {"id": _text(item, "call_id", param), "type": "function",
                "function": {"name": _text(item, "name", param), "arguments": _text(item, "arguments", param)}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
            last["tool_calls"].append(call)  # parallel calls of one turn
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _joined_text(output, f"{param}.output")
        messages.append({"role": "tool", "tool_call_id": _text(item, "call_id", param), "content": text})
    elif kind == "reasoning":
        return  # the model's own thinking stays out of the next prompt
    else:
        raise invalid_request(f"Input items of type {kind!r} are not supported.", param=f"{param}.type")


def _text(item: dict[str, Any], field: str, param: str) -> str:
    value = item.get(field)
    if not isinstance(value, str):
        raise invalid_request(f"'{field}' must be a string.", param=f"{param}.{field}")
    return value


def _content(content: Any, role: str, param: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise invalid_request("Message content must be a string or a non-empty list of parts.", param=param)
    if role != "user":  # system and assistant turns are text
        return _joined_text(content, param)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise invalid_request(f"Content parts of type {kind!r} are not supported (images by URL or data URL are).",
                                  param=f"{param}[{index}]")
    return parts


def _joined_text(content: Any, param: str) -> str:
    if not isinstance(content, list):
        raise invalid_request("Expected a string or a list of text parts.", param=param)
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in (*_TEXT_PARTS, "refusal"):
            raise invalid_request("Only text parts are supported here.", param=f"{param}[{index}]")
        texts.append(str(part.get("text") or part.get("refusal") or ""))
    return "".join(texts)


