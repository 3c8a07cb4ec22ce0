"""Batch input validation: every line is checked like a live request and every error is reported."""

import orjson
import pytest
import yaml

from api.batches.validate import Owner, validate_input
from settings import Settings
from settings.catalog import CatalogFile
from tests.support.processes import batch_jsonl, catalog_yaml

CATALOG = CatalogFile.model_validate(yaml.safe_load(catalog_yaml("http://127.0.0.1:1/v1")))
FREE = Owner("key_free", "free")


def _settings(**overrides: int) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


def _line(custom_id: str = "a", **fields: object) -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}}
    line.update(fields)
    return orjson.dumps(line)


def test_valid_file_becomes_chat_jobs() -> None:
    content = batch_jsonl(3, max_tokens=5) + orjson.dumps({
        "custom_id": "hinted", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "code", "models": ["text-basic"], "route": {"intent": "code"},
                 "messages": [{"role": "user", "content": "x"}], "temperature": 0.2}}) + b"\n\n"
    checked = validate_input(content, FREE, CATALOG, _settings())
    assert checked.error_count == 0
    assert [line.custom_id for line in checked.lines] == ["req-0", "req-1", "req-2", "hinted"]
    first = checked.lines[0].job
    assert first.requested_model is None and first.stream is False
    assert first.body == {"model": "auto", "messages": [{"role": "user", "content": "line 0"}], "max_tokens": 5}
    assert (first.key_id, first.tier) == ("key_free", "free")
    hinted = checked.lines[3].job
    assert hinted.requested_model == "code" and hinted.fallback_models == ["text-basic"]
    assert hinted.intent_hint == "code"
    assert "models" not in hinted.body and "route" not in hinted.body and hinted.body["temperature"] == 0.2


@pytest.mark.parametrize(("line", "code", "param"), [
    (b"{not json", "invalid_json_line", None),
    (b"[1, 2]", "invalid_json_line", None),
    (_line(custom_id=""), "missing_required_parameter", "custom_id"),
    (_line(method="GET"), "invalid_method", "method"),
    (_line(url="/v1/embeddings"), "invalid_url", "url"),
    (_line(body="hello"), "invalid_request", "body"),
    (_line(body={"messages": []}), "invalid_request_error", "body.messages"),
    (_line(body={"messages": [{"role": "user", "content": "x"}], "stream": True}), "invalid_request", "body.stream"),
    (_line(body={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}), "model_not_found",
     "body.model"),
    # A free key may not pin an exact upstream model, in a batch as live.
    (_line(body={"model": "general-best", "messages": [{"role": "user", "content": "x"}]}), "tier_not_allowed",
     "body.model"),
])
def test_bad_line_fails_the_batch_with_its_line_number(line: bytes, code: str, param: str | None) -> None:
    content = _line("first") + b"\n" + line + b"\n" + _line("last") + b"\n"
    checked = validate_input(content, FREE, CATALOG, _settings())
    assert checked.error_count == 1
    error = checked.errors[0]
    assert (error.code, error.line, error.param) == (code, 2, param)
    assert error.message


def test_duplicate_custom_id_and_every_error_reported() -> None:
    content = b"\n".join([_line("a"), _line("b"), _line("a"), b"oops", _line("b", url="/v1/x")])
    checked = validate_input(content, FREE, CATALOG, _settings())
    assert [(e.code, e.line) for e in checked.errors] == [
        ("duplicate_custom_id", 3), ("invalid_json_line", 4), ("duplicate_custom_id", 5)]


def test_line_limit_and_empty_file() -> None:
    over = validate_input(batch_jsonl(6), FREE, CATALOG, _settings(batch_max_lines=5))
    assert [e.code for e in over.errors] == ["too_many_requests"] and not over.lines
    assert validate_input(batch_jsonl(5), FREE, CATALOG, _settings(batch_max_lines=5)).error_count == 0
    empty = validate_input(b"\n\n", FREE, CATALOG, _settings())
    assert [e.code for e in empty.errors] == ["empty_file"]


def test_reported_errors_are_capped_but_counted() -> None:
    checked = validate_input(b"x\n" * 150, FREE, CATALOG, _settings())
    assert checked.error_count == 150 and len(checked.errors) == 100
