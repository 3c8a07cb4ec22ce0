"""Embeddings routing and answers (router/embeddings.py), request checks (api/dialects/embeddings.py)
and the catalog rules for embedding models."""

import base64
import struct

import pytest
from pydantic import ValidationError

from api.dialects.embeddings import check_embeddings
from api.errors import OpenAIError
from router.catalog import RuntimeCatalog
from router.embeddings import embedding_groups, encode_answer, longest_input_tokens, parse_answer
from router.errors import UpstreamServerError
from router.select import NoCandidates
from settings.catalog import CatalogFile


def _catalog(models: list[dict], capabilities: dict | None = None, env: dict | None = None) -> RuntimeCatalog:
    providers = [{"id": p, "base_url": f"http://{p}.invalid/v1", "requires_key": p == "keyed",
                  "api_keys_env": ["KEYED_KEY"] if p == "keyed" else []} for p in ("one", "two", "keyed")]
    file = CatalogFile.model_validate({
        "providers": providers, "models": models,
        "capabilities": capabilities or {"embedding": {"name": "Embedding Model", "endpoint": "embeddings"}}})
    return RuntimeCatalog.build(file, env or {})


def _embedder(model_id: str, provider: str, **extra: object) -> dict:
    return {"id": model_id, "provider": provider, "upstream_name": model_id, "context_window": 512,
            "capabilities": ["embeddings"], **extra}


CATALOG = [_embedder("first", "keyed"), _embedder("e5", "one"), _embedder("e5", "two"),
           _embedder("e5-alias", "two", embedding_space="e5"), _embedder("other", "one"),
           {"id": "chat", "provider": "one", "upstream_name": "chat", "context_window": 4096,
            "scores": {"general": 0.9}}]


def _keys(groups: list) -> list[list[str]]:
    return [[d.key for d in group] for group in groups]


def test_a_named_model_fails_over_to_its_other_providers_then_its_space_only() -> None:
    catalog = _catalog(CATALOG)
    assert _keys(embedding_groups(catalog, "e5")) == [["one/e5", "two/e5"], ["two/e5-alias"]]
    assert _keys(embedding_groups(catalog, "other")) == [["one/other"]]


def test_the_capability_means_the_first_space_with_a_deployment() -> None:
    # "first" has no key here, so the space is e5's, in full; never a mix with "other".
    assert _keys(embedding_groups(_catalog(CATALOG), "embedding")) == [["one/e5", "two/e5", "two/e5-alias"]]
    assert _keys(embedding_groups(_catalog(CATALOG), None)) == [["one/e5", "two/e5", "two/e5-alias"]]
    with_key = _catalog(CATALOG, env={"KEYED_KEY": "k"})
    assert _keys(embedding_groups(with_key, "embedding")) == [["keyed/first"]]


def test_a_chat_model_has_no_embeddings_candidates() -> None:
    with pytest.raises(NoCandidates):
        embedding_groups(_catalog(CATALOG), "chat")


def test_an_embedding_model_has_no_chat_scores() -> None:
    with pytest.raises(ValidationError, match="embedding model"):
        _catalog([_embedder("e5", "one", scores={"general": 0.5})])


def test_answers_are_reordered_by_index_and_checked() -> None:
    vectors, tokens = parse_answer({"data": [{"index": 1, "embedding": [0.5]}, {"index": 0, "embedding": [1, 2]}],
                                    "usage": {"prompt_tokens": 7}}, expected=2)
    assert vectors == [[1, 2], [0.5]] and tokens == 7
    broken: object
    for broken in ({"data": [{"embedding": [1.0]}]}, {"data": [{"index": 0, "embedding": []},
                                                               {"index": 1, "embedding": [1.0]}]},
                   {"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]},
                   {"data": [{"index": 0, "embedding": ["x"]}, {"index": 1, "embedding": [1.0]}]}, []):
        with pytest.raises(UpstreamServerError):
            parse_answer(broken, expected=2)


def test_base64_is_little_endian_float32_as_openai_sends_it() -> None:
    answer = encode_answer([[1.0, -0.5]], "e5", 3, "base64")
    raw = base64.b64decode(answer["data"][0]["embedding"])
    assert struct.unpack("<2f", raw) == (1.0, -0.5)
    assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3} and answer["model"] == "e5"
    assert encode_answer([[1.0]], "e5", 1, None)["data"][0]["embedding"] == [1.0]


def test_each_input_must_fit_on_its_own() -> None:
    assert longest_input_tokens({"input": ["ab", "x" * 400]}) == 101
    assert longest_input_tokens({"input": [1, 2, 3]}) == 3  # one input of token ids
    assert longest_input_tokens({"input": [[1, 2], [3, 4, 5, 6]]}) == 4


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "a", "extra": 1}, "extra"),
    ({"input": ["a", ""]}, "input[1]"),
    ({"input": [1, -1]}, "input[1]"),
    ({"input": [[1], []]}, "input[1]"),
    ({"input": ["a"] * 3}, "input"),  # over the cap of 2 below
    ({"input": "a", "dimensions": True}, "dimensions"),
    ({"input": "a", "model": 3}, "model"),
])
def test_request_checks_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as refused:
        check_embeddings(body, max_inputs=2)
    assert refused.value.status == 400 and refused.value.body.param == param
