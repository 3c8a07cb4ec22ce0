"""POST /v1/embeddings: the request checked at the edge, its job, and its answer.

An embeddings request rides the same path as a chat request (admission, the queue, a worker's
failover, usage), as a job whose `endpoint` is "embeddings"; the worker keeps it inside one
vector space (router/embeddings.py) and sends back the whole answer in OpenAI's shape.
"""

import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from api.dialects.base import ChatStream, DialectStream
from api.errors import OpenAIError, invalid_request
from api.keys import KeyRecord
from api.modelref import check_model_reference, resolve_model
from api.schemas import parse_json_object
from settings import Settings
from settings.catalog import CatalogFile
from workers.protocol import ChatJob, DoneEvent, Tier, new_job_id

# Token ids are non-negative and fit a 32-bit int in every tokenizer in use.
_MAX_TOKEN_ID = 2**31 - 1
_MAX_DIMENSIONS = 65536
_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
_TokenId = Annotated[int, Field(ge=0, le=_MAX_TOKEN_ID)]
_INPUTS = Field(min_length=1, max_length=2048)


class EmbeddingsRequest(BaseModel):
    """The request as documented (OpenAPI schema); the checks themselves are parse_embeddings's."""

    model_config = ConfigDict(extra="forbid")

    input: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], _INPUTS]
            | Annotated[list[_TokenId], _INPUTS] | Annotated[list[Annotated[list[_TokenId], Field(min_length=1)]],
                                                             _INPUTS]) = Field(
        description="A string, a list of strings, a list of token ids or a list of token-id lists "
                    "(at most max_embedding_inputs items, 2048 by default).")
    model: str | None = Field(default=None, description="An embedding model, an embeddings capability id or "
                                                        "'auto' (the default embedding space).")
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=_MAX_DIMENSIONS)
    user: str | None = None


def parse_embeddings(raw: bytes, max_depth: int, max_inputs: int) -> dict[str, Any]:
    """The request's JSON object, checked field by field (400 naming the field, OpenAI's format)."""
    return check_embeddings(parse_json_object(raw, max_depth), max_inputs)


def check_embeddings(data: dict[str, Any], max_inputs: int) -> dict[str, Any]:
    """`data` when it is a valid embeddings request (live or a batch line's body), else a 400."""
    unknown = next((name for name in data if name not in _FIELDS), None)
    if unknown is not None:
        raise invalid_request(f"Unrecognized request argument supplied: {unknown}", param=unknown)
    _check_input(data.get("input"), max_inputs)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid_request("'model' must be a string.", param="model")
    if data.get("encoding_format") not in (None, "float", "base64"):
        raise invalid_request("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or not 1 <= dimensions <= _MAX_DIMENSIONS):
        raise invalid_request(f"'dimensions' must be an integer from 1 to {_MAX_DIMENSIONS}.", param="dimensions")
    if data.get("user") is not None and not isinstance(data["user"], str):
        raise invalid_request("'user' must be a string.", param="user")
    return data


def _check_input(value: Any, max_inputs: int) -> None:
    if value is None:
        raise invalid_request("'input' is required: a string, a list of strings or of token ids.", param="input")
    if isinstance(value, str):
        if not value:
            raise invalid_request("'input' must not be an empty string.", param="input")
        return
    if not isinstance(value, list) or not value:
        raise invalid_request("'input' must be a non-empty string or a non-empty list.", param="input")
    if len(value) > max_inputs:
        raise invalid_request(f"'input' has {len(value)} items; at most {max_inputs} per request.", param="input")
    first = value[0]
    if type(first) is int:  # one input as token ids
        _check_tokens(value, "input")
        return
    for i, item in enumerate(value):
        if isinstance(first, str):
            if not isinstance(item, str) or not item:
                raise invalid_request(f"'input[{i}]' must be a non-empty string, as every item of a list of "
                                      "strings.", param=f"input[{i}]")
        elif isinstance(item, list) and item:
            _check_tokens(item, f"input[{i}]")
        else:
            raise invalid_request(f"'input[{i}]' must be a non-empty list of token ids (or 'input' a list of "
                                  "strings).", param=f"input[{i}]")


def _check_tokens(tokens: list[Any], param: str) -> None:
    for i, token in enumerate(tokens):
        if type(token) is not int or not 0 <= token <= _MAX_TOKEN_ID:
            raise invalid_request(f"'{param}[{i}]' must be a token id: an integer from 0 to {_MAX_TOKEN_ID}.",
                                  param=f"{param}[{i}]")


async def embeddings_job(request: Request, key: KeyRecord) -> ChatJob:
    """The job for one /v1/embeddings request (400 / 404 / 403 before anything is queued)."""
    state = request.app.state
    settings: Settings = state.settings
    catalog: CatalogFile = state.catalog
    body = parse_embeddings(await request.body(), settings.max_json_depth, settings.max_embedding_inputs)
    return embeddings_job_for(body, key.id, key.tier, catalog, new_job_id(state.hub.process_id),
                              request.state.request_id, state.hub.channel, settings.request_timeout_s)


def embeddings_job_for(body: dict[str, Any], key_id: str, tier: Tier, catalog: CatalogFile, job_id: str,
                       request_id: str, reply_channel: str, timeout_s: float) -> ChatJob:
    """The job of a checked embeddings body, its model checked for this key (live requests and batch lines)."""
    requested = resolve_model(catalog, body.get("model"))
    if requested is not None:
        check_model_reference(catalog, requested, tier, endpoint="embeddings")
    return ChatJob(job_id=job_id, request_id=request_id, reply_channel=reply_channel, body=body, stream=False,
                   requested_model=requested, key_id=key_id, tier=tier, endpoint="embeddings",
                   deadline_unix_ms=int((time.time() + timeout_s) * 1000))


class EmbeddingsAnswer:
    """The worker's answer as it came (it is already in OpenAI's shape); never streamed."""

    def completion(self, done: DoneEvent) -> bytes:
        if done.completion is None:
            raise OpenAIError(502, "The worker sent no embeddings.", code="upstream_failed")
        return orjson.dumps(done.completion)

    def stream(self) -> DialectStream:
        return ChatStream()  # unreachable: an embeddings job never streams
