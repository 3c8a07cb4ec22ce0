"""Embeddings: which deployments may answer a request, and the body and answer of one call.

Vectors from two embedding spaces cannot be compared, so an embeddings request is never failed
over from one space to another: its candidates are the deployments of the named model (on every
provider that serves it) and, after them, the catalog's other models of the same space. An
embeddings capability id names one space (settings.catalog.embedding_capability_space).
The caller's vectors come back in OpenAI's shape whichever provider served them; base64 (what
the official SDKs ask for by default) is encoded here from the provider's floats.
"""

import base64
import math
import sys
from array import array
from collections.abc import Sequence
from typing import Any

from router.catalog import Deployment, RuntimeCatalog
from router.errors import UpstreamServerError
from router.select import NoCandidates
from settings.catalog import embedding_capability_space

__all__ = ["embedding_body", "embedding_groups", "embedding_needs", "encode_answer", "estimated_prompt_tokens",
           "input_count", "longest_input_tokens", "parse_answer"]

# About four characters a token, as for chat prompts (router.select.estimate_tokens).
_CHARS_PER_TOKEN = 4


def embedding_groups(catalog: RuntimeCatalog, requested: str | None) -> list[list[Deployment]]:
    """The candidates of an embeddings request: the named model's deployments, then the rest of
    its space; for a capability id (or none), the whole space it names."""
    embedders = [d for d in catalog.deployments if d.model.embeds]
    named = [d for d in embedders if d.model.id == requested]
    if named:
        same_space = [d for d in embedders if d.model.space == named[0].model.space and d.model.id != requested]
        return [group for group in (named, same_space) if group]
    if requested is not None and not catalog.file.embedding_capability(requested):
        raise NoCandidates(requested)
    space = embedding_capability_space(catalog.file.models, {d.model.id for d in embedders})
    group = [d for d in embedders if d.model.space == space]
    if not group:
        raise NoCandidates(requested or "embedding")
    return [group]


def embedding_needs(body: dict[str, Any]) -> tuple[str, ...]:
    """The features (router.capabilities.FEATURES) an embeddings request needs of a model."""
    needs = []
    if body.get("dimensions") is not None:
        needs.append("dimensions")
    if _token_input(body.get("input")):
        needs.append("token_input")
    return tuple(needs)


def _token_input(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and not isinstance(value[0], str)


def _items(body: dict[str, Any]) -> list[Any]:
    """The inputs one by one: strings or token-id arrays (a flat list of ints is one input)."""
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        return [value]
    return value if isinstance(value, list) else []


def input_count(body: dict[str, Any]) -> int:
    """How many vectors the request asks for (one per string or token array)."""
    return len(_items(body))


def _tokens(item: Any) -> int:
    return len(item) // _CHARS_PER_TOKEN + 1 if isinstance(item, str) else len(item)


def longest_input_tokens(body: dict[str, Any]) -> int:
    """Estimated tokens of the longest input: each one must fit the model's window on its own."""
    return max((_tokens(item) for item in _items(body)), default=0)


def estimated_prompt_tokens(body: dict[str, Any]) -> int:
    """Tokens of every input, estimated, for an answer whose provider did not count them."""
    return sum(_tokens(item) for item in _items(body))


def embedding_body(deployment: Deployment, body: dict[str, Any]) -> dict[str, Any]:
    """What this deployment is sent: its model name, the input and, when asked, the output size.

    Floats are always asked for (encoding_format is not sent: every provider's default), and the
    caller's `user` stays here: nothing upstream needs to know who the caller's user is.
    """
    out: dict[str, Any] = {"model": deployment.model.upstream_name, "input": body["input"]}
    if body.get("dimensions") is not None:
        out["dimensions"] = body["dimensions"]
    return out


def parse_answer(data: Any, expected: int) -> tuple[list[list[float]], int | None]:
    """(one float vector per input, in input order; prompt tokens if the provider said) of a
    provider's answer. Raises UpstreamServerError for an answer that is not that."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != expected:
        raise UpstreamServerError("upstream embeddings answer without one vector per input", status=200)
    vectors: list[list[float] | None] = [None] * expected
    for position, item in enumerate(items):
        embedding = item.get("embedding") if isinstance(item, dict) else None
        index = item.get("index", position) if isinstance(item, dict) else position
        if (not isinstance(index, int) or not 0 <= index < expected or vectors[index] is not None
                or not _float_vector(embedding)):
            raise UpstreamServerError("upstream embeddings answer with a malformed vector", status=200)
        vectors[index] = embedding
    usage = data.get("usage")
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return [v for v in vectors if v is not None], prompt_tokens if isinstance(prompt_tokens, int) else None


def _float_vector(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(type(x) in (float, int) and math.isfinite(x) for x in value))


def encode_answer(vectors: Sequence[list[float]], model: str, prompt_tokens: int,
                  encoding_format: str | None) -> dict[str, Any]:
    """The caller's answer in OpenAI's shape, vectors as floats or base64 (little-endian float32)."""
    data = [{"object": "embedding", "index": i, "embedding": _base64(v) if encoding_format == "base64" else v}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def _base64(vector: list[float]) -> str:
    packed = array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")
