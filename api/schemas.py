"""Request validation for /v1/chat/completions.

The model below only validates: the body forwarded upstream is the caller's own JSON (minus
gateway-only fields), so no field is reformatted on the way through.
"""

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from api.errors import OpenAIError, invalid_request
from api.jsondepth import nesting_exceeds, too_deep

# Gateway-only fields: consumed here, never sent upstream.
GATEWAY_FIELDS = frozenset({"models", "route"})


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Open):
    type: str = Field(min_length=1)


def _document_non_empty_parts(schema: dict[str, Any]) -> None:
    # The OpenAPI document says what _non_empty_parts enforces (an array of content parts needs one).
    for option in schema.get("anyOf", []):
        if option.get("type") == "array":
            option["minItems"] = 1


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = Field(default=None, json_schema_extra=_document_non_empty_parts)
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _non_empty_parts(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("content parts must not be empty")
        return value


class RouteHint(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    intent: Literal["code", "reasoning", "general"] | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None


Probability = Annotated[float, Field(ge=0, le=1)]


class ChatCompletionRequest(BaseModel):
    """OpenAI chat completion request, plus `models` (ordered fallbacks) and `route` hints.

    Fields it does not name (vLLM's chat_template_kwargs, OpenRouter's provider or
    include_reasoning) are let through: the worker sends them to providers that take extra
    fields and leaves them out for strict ones (router/providers/profile.py).
    """

    model_config = ConfigDict(extra="allow", strict=True)

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    models: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=16)
    route: RouteHint | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Probability | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    seed: int | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Widely supported extensions of OpenAI-compatible servers (vLLM, OpenRouter, Groq …).
    top_k: int | None = None
    min_p: Probability | None = None
    repetition_penalty: float | None = None
    reasoning: dict[str, Any] | None = None


def deepest(exc: ValidationError) -> Any:
    """The most specific of a validation's errors: in a union, the branch that got furthest."""
    return max(exc.errors(), key=lambda err: len(err["loc"]))


def located_param(loc: tuple[int | str, ...], data: Any) -> str | None:
    """The JSON path ("input[2].content") of a validation error's location in `data`.

    Steps that are not keys or indexes of the data (the tags pydantic puts in a union's
    location) are skipped; a last step that is missing (a required field) is kept.
    """
    out, node = "", data
    for step, part in enumerate(loc):
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            out, node = out + f"[{part}]", node[part]
        elif isinstance(part, str) and isinstance(node, dict) and (part in node or step == len(loc) - 1):
            out, node = out + (f".{part}" if out else part), node.get(part)
    return out or None


def _param_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_chat_request(raw: bytes, max_depth: int) -> tuple[ChatCompletionRequest, dict[str, Any]]:
    """Decode and validate a request body; returns the model and the raw JSON object.

    400 for JSON nested deeper than `max_depth` (settings.max_json_depth).
    """
    data = parse_json_object(raw, max_depth)
    return validate_chat_body(data), data


def parse_json_object(raw: bytes, max_depth: int) -> dict[str, Any]:
    """A request body's JSON object (400 for bad UTF-8, bad JSON, another type, or nesting past `max_depth`)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request("Request body is not valid UTF-8.") from None
    if not text.strip():
        raise invalid_request("Request body is empty; expected a JSON object.")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"We could not parse the JSON body of your request: {exc.msg}.") from None
    if not isinstance(data, dict):
        raise invalid_request("Request body must be a JSON object.")
    if nesting_exceeds(data, max_depth, raw):
        raise too_deep(max_depth)
    return data


def validate_chat_body(data: dict[str, Any]) -> ChatCompletionRequest:
    """A chat completion request (the dialects' translations go through the same checks); 400 naming the field."""
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_to_openai(exc) from None


def _validation_to_openai(exc: ValidationError) -> OpenAIError:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":  # inside a gateway-only object (route): only its own fields
        return invalid_request(f"Unrecognized request argument supplied: {loc[-1]}", param=_param_path(loc))
    # Union errors carry the variant name in the location; keep the field path only.
    clean = tuple(p for p in loc if isinstance(p, int) or (not str(p)[:1].isupper() and "[" not in str(p)))
    param = _param_path(clean) or None
    if param == "messages" and err["type"] == "too_short":
        return invalid_request("'messages' must contain at least one message.", param="messages")
    return invalid_request(f"Invalid value for '{param}': {err['msg']}.", param=param)
