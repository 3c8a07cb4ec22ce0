"""The simulated provider's answers: schema-valid tool arguments and JSON, unique ids, honest finish reasons."""

import datetime
import enum
import json
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from bench import simulated
from bench.simulated import answer, instance, reply_tokens


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Address(BaseModel):
    street: str
    city: str = Field(min_length=12)
    zip_code: str = Field(max_length=5)


class Person(BaseModel):
    """What LangChain's structured output asks a model for: nested models, enums, optionals, bounds."""

    name: str
    age: int = Field(ge=18, le=130)
    score: float = Field(gt=0, lt=1)
    email: str | None = None
    unit: Unit
    kind: Literal["customer", "supplier"]
    tags: list[str] = Field(min_length=2)
    home: Address
    previous: list[Address] = []
    born: datetime.date
    parent: "Person | None" = None  # recursive through $defs


def _tool(model: type[BaseModel], name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": model.model_json_schema()}}


@pytest.mark.parametrize("demo", [False, True])
def test_tool_arguments_validate_against_the_tools_schema(demo: bool) -> None:
    body = {"messages": [{"role": "user", "content": "Extract the person."}], "tools": [_tool(Person, "Person")]}
    result = answer(body, "m", 16, demo)
    assert result.tool_call is not None and result.finish_reason == "tool_calls"
    person = Person.model_validate_json(result.tool_call["function"]["arguments"])
    assert len(person.tags) == 2 and len(set(person.tags)) == 2
    assert ("simulated" in person.name) == demo


def test_the_tool_named_by_tool_choice_or_the_prompt_is_called() -> None:
    tools = [_tool(Address, "address"), _tool(Person, "person")]
    named = {"messages": [{"role": "user", "content": "hi"}], "tools": tools,
             "tool_choice": {"type": "function", "function": {"name": "person"}}}
    assert answer(named, "m", 16, True).tool_call["function"]["name"] == "person"
    mentioned = {"messages": [{"role": "user", "content": "Use person please"}], "tools": tools}
    assert answer(mentioned, "m", 16, True).tool_call["function"]["name"] == "person"
    plain = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    assert answer(plain, "m", 16, True).tool_call["function"]["name"] == "address"
    after_tool = {"messages": [{"role": "tool", "tool_call_id": "c", "content": "ok"}], "tools": tools}
    assert answer(after_tool, "m", 16, True).tool_call is None


def test_test_flavour_keeps_the_answers_the_suite_relies_on() -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    call = answer({"messages": [{"role": "user", "content": "Weather?"}], "tools": [weather]}, "m", 16, False)
    assert json.loads(call.tool_call["function"]["arguments"]) == {"city": "x"}
    text = answer({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}, "m", 16, False)
    assert (text.pieces, text.finish_reason) == (reply_tokens("m", 40), "stop")


def test_json_modes_answer_json() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema(),
                                                     "strict": True}}
    result = answer({"messages": [{"role": "user", "content": "x"}], "response_format": schema}, "m", 16, True)
    Person.model_validate_json("".join(result.pieces))
    plain = answer({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
                   "sim-a", 16, True)
    assert json.loads("".join(plain.pieces))["simulated"] is True


def test_demo_replies_have_a_natural_length_and_say_when_max_tokens_cut_them() -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    whole = answer(body, "m", 16, True)
    assert (len(whole.pieces), whole.finish_reason) == (16, "stop")
    assert "simulated" in "".join(whole.pieces)
    cut = answer({**body, "max_tokens": 5}, "m", 16, True)
    assert (cut.pieces, cut.finish_reason) == (reply_tokens("m", 5), "length")
    roomy = answer({**body, "max_tokens": 100}, "m", 16, True)
    assert (len(roomy.pieces), roomy.finish_reason) == (16, "stop")
    cut_json = answer({**body, "max_tokens": 2, "response_format": {"type": "json_object"}}, "m", 16, True)
    assert cut_json.finish_reason == "length" and len(cut_json.pieces) == 2


def test_ids_are_unique() -> None:
    assert len({simulated.completion_id() for _ in range(100)}) == 100
    assert len({simulated.tool_call_id() for _ in range(100)}) == 100


@pytest.mark.parametrize(("schema", "expected"), [
    ({"type": "integer", "multipleOf": 5, "minimum": 3}, 5),
    ({"type": ["null", "boolean"]}, True),
    ({"enum": ["a", "b"]}, "a"),
    ({"const": 7}, 7),
    ({"type": "array", "maxItems": 0}, []),
    ({"type": "string", "format": "email"}, "simulated@example.com"),
    ({"allOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"b": {"const": 1}}}]}, {"a": 1, "b": 1}),
])
def test_schema_instances(schema: dict[str, Any], expected: Any) -> None:
    assert instance(schema, "simulated") == expected
