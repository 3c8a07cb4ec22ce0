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

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.errors import invalid_request
from api.schemas import parse_json_object

_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


class ResponsesRequest(BaseModel):
    """The fields of a Responses request the gateway reads (others are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[dict[str, Any]]
    model: str | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    reasoning: dict[str, Any] | None = None
    user: str | None = None
    background: bool | None = None
    # Gateway extensions, as on chat: ordered fallbacks and an intent override.
    models: list[str] | None = None
    route: dict[str, Any] | None = None


def parse_responses_request(raw: bytes, max_depth: int) -> ResponsesRequest:
    """The validated request (400 naming the problem)."""
    data = parse_json_object(raw, max_depth)
    try:
        request = ResponsesRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not str(p)[:1].isupper()) or None
        raise invalid_request(f"Invalid value for '{param}': {err['msg']}.", param=param) from None
    for name, value in (("background", request.background), ("prompt", data.get("prompt")),
                        ("conversation", data.get("conversation"))):
        if value:
            raise invalid_request(f"'{name}' is not supported by this gateway.", param=name)
    return request


def input_items(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as a list of items (a string is one user message)."""
    if isinstance(request.input, str):
        return [{"type": "message", "role": "user", "content": request.input}]
    return request.input


def to_chat(request: ResponsesRequest, conversation: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion body for this request, `conversation` being every input item in order."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    for index, item in enumerate(conversation):
        _add_item(messages, item, f"input[{index}]")
    if not messages:
        raise invalid_request("'input' must contain at least one message.", param="input")
    body: dict[str, Any] = {"messages": messages}
    if request.model is not None:
        body["model"] = request.model
    if request.tools:
        body["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(request.tools)]
    if request.tool_choice is not None:
        body["tool_choice"] = _tool_choice(request.tool_choice)
    response_format = _response_format(request.text)
    if response_format is not None:
        body["response_format"] = response_format
    for source, target in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                           ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user"),
                           ("models", "models"), ("route", "route")):
        value = getattr(request, source)
        if value is not None:
            body[target] = value
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


def _tool(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise invalid_request(f"Tools of type {kind!r} are not supported; only function tools are.", param=param)
    if not isinstance(tool.get("name"), str):
        raise invalid_request("A function tool needs a 'name'.", param=f"{param}.name")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise invalid_request(f"Unsupported tool_choice {choice!r}.", param="tool_choice")
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise invalid_request("tool_choice must be 'auto', 'none', 'required' or a function.", param="tool_choice")


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise invalid_request(f"Unsupported text.format type {fmt['type']!r}.", param="text.format.type")

