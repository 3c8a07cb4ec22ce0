"""POST /v1/embeddings through real processes (API → Redis → worker → fake upstream), the official
openai SDK as the client: vectors in OpenAI's shape, failover only inside one vector space."""

import base64
import io
import json
import struct
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
import yaml

from bench.simulated import vector
from tests.integration.test_failover_support import forget_health
from tests.support.processes import FakeUpstream, Gateway, catalog_yaml, wait_batch

pytestmark = pytest.mark.integration


def embeddings_catalog(upstream_url: str) -> str:
    """The test catalog's chat models, plus: embed-a (two providers: fake-a, then fake-b as the
    declared same-space embed-a-mirror) and embed-other (another space)."""
    data = yaml.safe_load(catalog_yaml(upstream_url))

    def embedder(model_id: str, provider: str, caps: list[str], **extra: str) -> dict:
        return {"id": model_id, "provider": provider, "upstream_name": model_id, "context_window": 512,
                "capabilities": ["embeddings", *caps], **extra}

    data["models"] = [m for m in data["models"] if "embeddings" not in m["capabilities"]]  # its own below
    data["models"] += [embedder("embed-a", "fake-a", ["dimensions", "token_input"]),
                       embedder("embed-a-mirror", "fake-b", ["dimensions", "token_input"], embedding_space="embed-a"),
                       embedder("embed-other", "fake-b", [])]
    data["capabilities"]["embedding"] = {"name": "Embedding Model", "endpoint": "embeddings"}
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway], fake_upstream: FakeUpstream) -> Iterator[Gateway]:
    # No spreading: embed-a (first in the catalog) serves until it fails, so failover is visible.
    yield module_gateway_factory(workers=1, catalog=embeddings_catalog(fake_upstream.url),
                                 FREEFERENCE_SPREAD_SCORE_BAND="0")


@pytest.fixture
def client(gateway: Gateway, upstream: FakeUpstream) -> openai.OpenAI:
    forget_health(gateway)
    return gateway.client(gateway.create_key("free"))


@pytest.fixture
def pro(gateway: Gateway, upstream: FakeUpstream) -> openai.OpenAI:
    forget_health(gateway)
    return gateway.client(gateway.create_key("pro"))


def _floats(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_the_sdk_default_base64_decodes_to_the_providers_floats(client: openai.OpenAI,
                                                                 upstream: FakeUpstream) -> None:
    answer = client.embeddings.create(model="embedding", input=["first text", "second text"])
    assert answer.model == "embed-a" and [d.index for d in answer.data] == [0, 1]
    for item, text in zip(answer.data, ("first text", "second text"), strict=True):
        assert item.embedding == pytest.approx(vector("embed-a", text, 8), abs=1e-6)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0
    sent = upstream.requests("embed-a")[-1]
    assert sent["endpoint"] == "embeddings"
    assert sent["body"] == {"model": "embed-a", "input": ["first text", "second text"]}  # floats asked, no user


def test_floats_dimensions_and_token_ids(client: openai.OpenAI, gateway: Gateway) -> None:
    raw = httpx.post(f"{gateway.base_url}/v1/embeddings", headers={"Authorization": f"Bearer {client.api_key}"},
                     json={"input": "one text", "encoding_format": "float", "dimensions": 4}, timeout=30)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["object"] == "list" and body["model"] == "embed-a"  # no model: the default space
    assert body["data"][0]["embedding"] == pytest.approx(vector("embed-a", "one text", 4), abs=1e-6)
    assert raw.headers["x-freeference-model"] == "embed-a" and "x-ratelimit-remaining-requests" in raw.headers
    assert "x-freeference-intent" not in raw.headers
    tokens = client.embeddings.create(model="embedding", input=[[1, 2, 3], [4, 5]], encoding_format="float")
    assert [len(d.embedding) for d in tokens.data] == [8, 8] and tokens.usage.prompt_tokens == 5
    # LangChain's and LlamaIndex's default model names reach the embedding capability.
    assert client.embeddings.create(model="text-embedding-ada-002", input="x").model == "embed-a"


def test_failover_stays_inside_the_vector_space(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.set_default("embed-a", {"status": 503})
    served = client.embeddings.create(model="embedding", input="some text")
    assert served.model == "embed-a-mirror"  # declared the same space
    upstream.set_default("embed-a-mirror", {"status": 503})
    with pytest.raises(openai.APIStatusError) as failed:
        client.embeddings.create(model="embedding", input="some text")
    assert failed.value.status_code == 502 and failed.value.code == "upstream_failed"
    assert upstream.requests("embed-other") == []  # never another space's vectors


def test_an_answer_without_one_vector_per_input_is_that_providers_failure(client: openai.OpenAI,
                                                                          upstream: FakeUpstream) -> None:
    upstream.set_default("embed-a", {"vectors": 1})  # retried like any server error, then failed over
    served = client.embeddings.create(model="embedding", input=["a", "b"], encoding_format="float")
    assert served.model == "embed-a-mirror" and len(served.data) == 2


def test_a_space_without_what_the_request_needs_is_a_400_before_any_call(pro: openai.OpenAI,
                                                                         upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        pro.embeddings.create(model="embed-other", input="text", dimensions=4)
    assert refused.value.code == "unsupported_capability" and refused.value.param == "dimensions"
    assert upstream.requests() == []
    assert pro.embeddings.create(model="embed-other", input="text").model == "embed-other"  # pinned: its own space


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["a", 3]}, "input[1]"),
    ({"input": [[1, 2], "b"]}, "input[1]"),
    ({"input": [-5]}, "input[0]"),
    ({"input": [[1, 2**40]]}, "input[0][1]"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "messages": []}, "messages"),
])
def test_bad_input_is_a_400_naming_the_field(gateway: Gateway, client: openai.OpenAI, body: dict,
                                             param: str) -> None:
    answer = httpx.post(f"{gateway.base_url}/v1/embeddings", json=body, timeout=10,
                        headers={"Authorization": f"Bearer {client.api_key}"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_models_are_served_by_their_own_endpoint(client: openai.OpenAI, pro: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as chat_model:
        pro.embeddings.create(model="general-best", input="text")
    assert chat_model.value.code == "unsupported_model" and "/v1/chat/completions" in chat_model.value.message
    with pytest.raises(openai.BadRequestError) as embedder:
        client.chat.completions.create(model="embedding", messages=[{"role": "user", "content": "hi"}])
    assert embedder.value.code == "unsupported_model" and "/v1/embeddings" in embedder.value.message
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="embed-a", input="text")  # a free key pins no exact model
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-embedder", input="text")


def test_the_capability_is_listed_with_its_space(client: openai.OpenAI) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert "embedding" in cards and "embeddings" in (cards["embedding"].model_extra or {})["capabilities"]
    assert "embeddings" not in (cards["auto"].model_extra or {})["capabilities"]


def test_a_batch_of_embeddings_lines(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    lines = [{"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "embedding", "input": f"document {i}"}} for i in range(3)]
    lines.append({"custom_id": "wrong-url", "method": "POST", "url": "/v1/chat/completions", "body": {}})
    bad = client.files.create(file=("e.jsonl", io.BytesIO(b"\n".join(json.dumps(x).encode() for x in lines))),
                              purpose="batch")
    refused = wait_batch(client, client.batches.create(input_file_id=bad.id, endpoint="/v1/embeddings",
                                                       completion_window="24h").id, {"failed"}, timeout_s=10)
    assert refused.errors.data[0].line == 4 and refused.errors.data[0].param == "url"
    good = client.files.create(file=("e.jsonl", io.BytesIO(b"\n".join(json.dumps(x).encode() for x in lines[:3]))),
                               purpose="batch")
    batch = client.batches.create(input_file_id=good.id, endpoint="/v1/embeddings", completion_window="24h")
    done = wait_batch(client, batch.id, {"completed", "failed"}, timeout_s=30)
    assert done.status == "completed" and done.request_counts.completed == 3
    assert done.output_file_id is not None
    results = {r["custom_id"]: r["response"] for r in map(json.loads, client.files.content(done.output_file_id).text
                                                          .splitlines())}
    for i in range(3):
        answer = results[f"doc-{i}"]
        assert answer["status_code"] == 200 and answer["body"]["model"] == "embed-a"
        assert answer["body"]["data"][0]["embedding"] == pytest.approx(vector("embed-a", f"document {i}", 8),
                                                                       abs=1e-6)
