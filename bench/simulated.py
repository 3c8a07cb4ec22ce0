"""What the simulated provider answers: deterministic text, tool calls and JSON that fit the request.

The fake upstream (bench/fake_upstream.py) serves the tests and, as the clearly labelled
"simulated" provider, `freeference serve --demo`. Both get:

- unique completion and tool-call ids;
- a tool call when the request offers tools (the one `tool_choice` names, else the first whose
  name the last user message mentions, else the first), with arguments generated from the
  tool's JSON schema, so they validate against it (pydantic models, LangChain's structured
  output);
- JSON content for `response_format` `json_object` and `json_schema` (an instance of the schema).

The demo flavour (`--demo`) also answers like a model with something to say: a text reply has a
natural length and is cut by `max_tokens` with `finish_reason: "length"` (a JSON reply too), and
generated strings say "simulated". The test flavour keeps what the test suite relies on: a reply
of exactly `max_tokens` tokens ending with "stop", and "x" for generated strings.
"""

import hashlib
import math
import secrets
from dataclasses import dataclass
from typing import Any

import orjson

_MAX_DEPTH = 12  # recursive schemas ($ref cycles) end in null / empty values below this
_FORMATS = {"date-time": "2025-01-01T00:00:00Z", "date": "2025-01-01", "time": "00:00:00",
            "email": "simulated@example.com", "uri": "https://example.com/simulated",
            "url": "https://example.com/simulated", "hostname": "example.com", "ipv4": "192.0.2.1",
            "ipv6": "2001:db8::1", "uuid": "00000000-0000-4000-8000-000000000000"}


def reply_tokens(model: str, count: int, prefix: str = "") -> list[str]:
    """The deterministic content the fake produces, token by token."""
    head = [f"[{model}]", " simulated", " reply:"]
    tokens = (head + [f" {i}" for i in range(1, max(count, 1) + 1)])[: max(count, 1)]
    if prefix:  # continuing an assistant prefix: produce the rest after what exists
        tokens = [f" cont{i}" for i in range(1, max(count, 1) + 1)]
    return tokens


def completion_id() -> str:
    """A fresh chat completion id."""
    return "chatcmpl-sim-" + secrets.token_hex(12)


def tool_call_id() -> str:
    """A fresh tool call id."""
    return "call_sim_" + secrets.token_hex(8)


@dataclass
class Answer:
    """One choice's answer: content pieces (one per token) or a tool call, and how it ended."""

    pieces: list[str]
    tool_call: dict[str, Any] | None
    finish_reason: str
    completion_tokens: int


def answer(body: dict[str, Any], model: str, natural_tokens: int, demo: bool) -> Answer:
    """What to answer to a chat body (see the module docstring)."""
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    limit = int(limit) if isinstance(limit, int | float) and limit > 0 else None
    call = tool_call(body, demo)
    if call is not None:
        return Answer([], call, "tool_calls", 5)
    text = json_content(body, model, demo)
    if text is not None:
        pieces = [text[i:i + 4] for i in range(0, len(text), 4)] or [""]
        finish = "stop"
        if demo and limit is not None and limit < len(pieces):
            pieces, finish = pieces[:limit], "length"  # cut mid-JSON, as a real model is
        return Answer(pieces, None, finish, len(pieces))
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    prefix = last.get("content") if last.get("role") == "assistant" and isinstance(last.get("content"), str) else ""
    if demo:
        count = min(limit or natural_tokens, natural_tokens, 4096)
        finish = "length" if limit is not None and limit < natural_tokens else "stop"
    else:
        count, finish = min(limit or natural_tokens, 4096), "stop"
    pieces = reply_tokens(model, count, prefix or "")
    return Answer(pieces, None, finish, len(pieces))


def chosen_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function definition the simulated model calls, or None when it answers in text."""
    tools = [t.get("function") for t in body.get("tools") or [] if isinstance(t, dict)]
    functions = [f for f in tools if isinstance(f, dict)]
    messages = body.get("messages") or []
    choice = body.get("tool_choice")
    if not functions or choice == "none" or (messages and isinstance(messages[-1], dict)
                                             and messages[-1].get("role") == "tool"):
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        named = [f for f in functions if f.get("name") == wanted]
        if named:
            return named[0]
    asked = _last_user_text(messages).lower()
    mentioned = [f for f in functions if str(f.get("name", "")).lower() in asked and f.get("name")]
    return (mentioned or functions)[0]


def tool_call(body: dict[str, Any], demo: bool) -> dict[str, Any] | None:
    """A tool call whose arguments are an instance of the chosen tool's parameter schema."""
    function = chosen_tool(body)
    if function is None:
        return None
    schema = function.get("parameters") or {"type": "object"}
    arguments = instance(schema, filler="simulated" if demo else "x")
    return {"id": tool_call_id(), "type": "function",
            "function": {"name": function.get("name", "tool"), "arguments": orjson.dumps(arguments).decode()}}


def json_content(body: dict[str, Any], model: str, demo: bool) -> str | None:
    """The content for `response_format` json_object / json_schema; None for a text answer."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return orjson.dumps(instance(schema or {"type": "object"}, filler="simulated" if demo else "x")).decode()
    if fmt.get("type") == "json_object":
        return orjson.dumps({"simulated": True, "model": model,
                             "reply": "".join(reply_tokens(model, 6)).strip()}).decode()
    return None


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def instance(schema: Any, filler: str = "x") -> Any:
    """A value that validates against a JSON schema (the subset tool and response schemas use:
    types, properties, items, enum, const, anyOf / oneOf / allOf, $ref to $defs, formats, bounds)."""
    return _Generator(schema if isinstance(schema, dict) else {}, filler).value(schema, "value", 0, 0)


class _Generator:
    def __init__(self, root: dict[str, Any], filler: str) -> None:
        self.root = root
        self.filler = filler
        self.expanding: list[str] = []  # $refs on the current path: a cycle takes its null branch

    def resolve(self, ref: str) -> Any:
        node: Any = self.root
        for part in ref.removeprefix("#").strip("/").split("/"):
            if not part:
                continue
            node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def value(self, schema: Any, name: str, depth: int, index: int) -> Any:
        if not isinstance(schema, dict):
            return self.text({}, name, index)  # `true` or a missing schema: anything goes
        if depth > _MAX_DEPTH:
            return None
        if isinstance(schema.get("$ref"), str):
            ref = schema["$ref"]
            self.expanding.append(ref)
            try:
                return self.value({**self.resolve(ref), **{k: v for k, v in schema.items() if k != "$ref"}},
                                  name, depth + 1, index)
            finally:
                self.expanding.pop()
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][index % len(schema["enum"])]
        for combinator in ("anyOf", "oneOf"):
            options = schema.get(combinator)
            if isinstance(options, list) and options:
                # The first alternative that is not null (Optional[X] answers an X), unless it
                # would recurse into a definition being generated (then null, if allowed).
                chosen = next((o for o in options if isinstance(o, dict) and o.get("type") != "null"
                               and o.get("$ref") not in self.expanding),
                              next((o for o in options if isinstance(o, dict) and o.get("type") == "null"),
                                   options[0]))
                rest = {k: v for k, v in schema.items() if k != combinator}
                return self.value({**rest, **chosen} if isinstance(chosen, dict) else chosen, name, depth + 1, index)
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
                if isinstance(part, dict):
                    merged["properties"] = {**merged.get("properties", {}), **part.get("properties", {})}
                    merged["required"] = [*merged.get("required", []), *part.get("required", [])]
                    merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
            return self.value(merged, name, depth + 1, index)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        if kind == "object":
            return self.obj(schema, depth)
        if kind == "array":
            return self.array(schema, name, depth)
        if kind in ("integer", "number"):
            return self.number(schema, kind, index)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self.text(schema, name, index)

    def obj(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        out = {key: self.value(sub, key, depth + 1, 0) for key, sub in properties.items()}
        for key in schema.get("required") or []:
            if isinstance(key, str) and key not in out:
                out[key] = self.text({}, key, 0)
        return out

    def array(self, schema: dict[str, Any], name: str, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            return [self.value(item, name, depth + 1, i) for i, item in enumerate(prefix)]
        count = max(int(schema.get("minItems") or 0), 1)
        if isinstance(schema.get("maxItems"), int):
            count = min(count, schema["maxItems"])
        singular = name[:-1] if name.endswith("s") and len(name) > 1 else name
        return [self.value(schema.get("items", {}), singular, depth + 1, i) for i in range(count)]

    @staticmethod
    def number(schema: dict[str, Any], kind: str, index: int) -> int | float:
        integer = kind == "integer"
        low = schema.get("minimum")
        if isinstance(schema.get("exclusiveMinimum"), int | float):
            low = schema["exclusiveMinimum"] + (1 if integer else 0.5)
        high = schema.get("maximum")
        if isinstance(schema.get("exclusiveMaximum"), int | float):
            high = schema["exclusiveMaximum"] - (1 if integer else 0.5)
        value: float = (low if isinstance(low, int | float) else 1) + index
        if isinstance(high, int | float) and value > high:
            value = high
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and step > 0:
            value = math.ceil(value / step) * step
        return math.ceil(value) if integer else float(value)

    def text(self, schema: dict[str, Any], name: str, index: int) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt]
        value = self.filler if self.filler == "x" else f"{self.filler} {name}"
        if index:
            value += f" {index + 1}"
        low = schema.get("minLength")
        if isinstance(low, int) and len(value) < low:
            value += "." * (low - len(value))
        high = schema.get("maxLength")
        if isinstance(high, int) and len(value) > high:
            value = value[:high]
        return value


def vector(model: str, item: str | list[int], size: int) -> list[float]:
    """A unit vector that depends only on the model and the input: the simulated embedding."""
    seed = hashlib.sha256(model.encode() + b"\0" + orjson.dumps(item)).digest()
    raw = [(seed[i % len(seed)] ^ (i * 131 % 256)) / 127.5 - 1.0 for i in range(size)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]
