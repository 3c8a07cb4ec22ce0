"""OpenAI Batch API over /v1/chat/completions: create (validates every line), list, retrieve, cancel."""

import asyncio
import secrets
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from api.batches import store
from api.batches.validate import BATCH_URLS, Owner, validate_input
from api.deps import CatalogDep, CurrentKey, RedisDep, SettingsDep
from api.errors import invalid_request
from api.keys import effective_limits
from settings.config import FILE_EXPIRY_MAX_S, FILE_EXPIRY_MIN_S
from workers.protocol import BatchSpec

router = APIRouter()

COMPLETION_WINDOWS = ("24h",)


class ExpiresAfter(BaseModel):
    """OpenAI's expiration policy: `seconds` after `created_at`, from an hour to 30 days."""

    anchor: Literal["created_at"]
    seconds: int = Field(ge=FILE_EXPIRY_MIN_S, le=FILE_EXPIRY_MAX_S)


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1)
    # The enums only document what the checks below accept (their messages stay OpenAI's).
    endpoint: str = Field(json_schema_extra={"enum": list(BATCH_URLS)})
    completion_window: str = Field(json_schema_extra={"enum": [*COMPLETION_WINDOWS]})
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16)
    # How long the output and error files live (default: settings.file_expiry_s, 30 days).
    output_expires_after: ExpiresAfter | None = None


@router.post("/v1/batches")
async def create_batch(body: CreateBatchRequest, key: CurrentKey, redis: RedisDep, settings: SettingsDep,
                       catalog: CatalogDep) -> dict[str, Any]:
    """Create a batch from an uploaded file; every line is validated before any line runs."""
    if body.endpoint not in BATCH_URLS:
        raise invalid_request(f"The endpoint must be one of {', '.join(BATCH_URLS)}.", param="endpoint")
    if body.completion_window not in COMPLETION_WINDOWS:
        raise invalid_request("completion_window must be '24h'.", param="completion_window")
    record = await store.get_file(redis, key.id, body.input_file_id)
    if record.purpose != "batch":
        raise invalid_request("The input file must have purpose 'batch'.", param="input_file_id")
    content = await store.file_content(redis, key.id, body.input_file_id)
    now = int(time.time())
    spec = BatchSpec(id="batch_" + secrets.token_hex(12), owner=key.id, endpoint=body.endpoint,
                     input_file_id=body.input_file_id, completion_window=body.completion_window, created_at=now,
                     expires_at=now + int(settings.batch_window_s), metadata=body.metadata,
                     output_expires_after_s=body.output_expires_after.seconds if body.output_expires_after else None)
    await store.create_batch(redis, spec)
    # A 200 MB file takes seconds to check: off the event loop, so live requests keep flowing.
    checked = await asyncio.to_thread(validate_input, content, Owner(key.id, key.tier), catalog, settings,
                                      body.endpoint)
    cap = effective_limits(key, settings).batch_lines
    queued = await store.queued_lines(redis, key.id)
    if checked.error_count:
        await store.fail_batch(redis, spec.id, checked.errors, checked.error_count)
    elif queued + len(checked.lines) > cap:  # checked again, atomically, when the lines are queued
        await store.fail_batch(redis, spec.id, [store.over_queued_cap(len(checked.lines), queued, cap)], 1)
    elif (refused := await store.start_batch(redis, spec, checked.lines, cap)) is not None:
        await store.fail_batch(redis, spec.id, [refused], 1)
    return await store.get_batch(redis, key.id, spec.id)


@router.get("/v1/batches")
async def list_batches(key: CurrentKey, redis: RedisDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                       after: str | None = None) -> dict[str, Any]:
    """The caller's batches, newest first."""
    data, has_more = await store.list_batches(redis, key.id, limit, after)
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """One of the caller's batches."""
    return await store.get_batch(redis, key.id, batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """Cancel one of the caller's batches (status `cancelling`, then `cancelled`)."""
    return await store.cancel_batch(redis, key.id, batch_id)
