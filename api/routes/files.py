"""OpenAI Files API (purpose `batch`): upload, list, retrieve, download, delete."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from api.batches import store
from api.deps import CurrentKey, RedisDep, SettingsDep
from api.errors import OpenAIError, invalid_request
from settings.config import FILE_EXPIRY_MAX_S, FILE_EXPIRY_MIN_S

router = APIRouter()


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    """The whole upload (one read, one copy in memory), or 413 when it is over `limit` bytes."""
    content = await upload.read(limit + 1)
    if len(content) > limit:
        raise OpenAIError(413, f"File is larger than the limit of {limit} bytes.", code="file_too_large",
                          param="file")
    return content


def _expiry_s(anchor: str | None, seconds: int | None, default_s: int) -> int:
    """OpenAI's `expires_after` (anchor `created_at`, 1 hour to 30 days); unset: the default."""
    if anchor is None and seconds is None:
        return default_s
    if anchor != "created_at":
        raise invalid_request("expires_after[anchor] must be 'created_at'.", param="expires_after[anchor]")
    if seconds is None or not FILE_EXPIRY_MIN_S <= seconds <= FILE_EXPIRY_MAX_S:
        raise invalid_request(f"expires_after[seconds] must be between {FILE_EXPIRY_MIN_S} and {FILE_EXPIRY_MAX_S}.",
                              param="expires_after[seconds]")
    return seconds


@router.post("/v1/files")
async def upload_file(key: CurrentKey, redis: RedisDep, settings: SettingsDep,
                      file: Annotated[UploadFile, File(json_schema_extra={"minLength": 1})],
                      purpose: Annotated[str, Form(json_schema_extra={"enum": ["batch"]})],
                      expires_anchor: Annotated[str | None, Form(alias="expires_after[anchor]",
                                                                 json_schema_extra={"enum": ["created_at"]})] = None,
                      expires_seconds: Annotated[int | None, Form(alias="expires_after[seconds]")] = None,
                      ) -> dict[str, Any]:
    """Upload a JSONL file for the Batch API (multipart: `file`, `purpose=batch`, optional `expires_after`)."""
    if purpose != "batch":
        raise invalid_request("Only purpose 'batch' is supported.", param="purpose")
    expiry_s = _expiry_s(expires_anchor, expires_seconds, settings.file_expiry_s)
    content = await _read_limited(file, settings.batch_upload_max_bytes)
    if not content.strip():
        raise invalid_request("The file is empty.", param="file")
    record = await store.create_file(redis, key.id, file.filename or "upload.jsonl", purpose, content,
                                     settings.batch_storage_max_bytes_per_key, expiry_s)
    return store.file_object(record)


@router.get("/v1/files")
async def list_files(key: CurrentKey, redis: RedisDep, purpose: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, after: str | None = None,
                     order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    """The caller's files."""
    records, has_more = await store.list_files(redis, key.id, purpose, limit, after, order)
    data = [store.file_object(r) for r in records]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """One of the caller's files."""
    return store.file_object(await store.get_file(redis, key.id, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, key: CurrentKey, redis: RedisDep) -> Response:
    """The bytes of one of the caller's files."""
    return Response(await store.file_content(redis, key.id, file_id), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """Delete one of the caller's files."""
    await store.delete_file(redis, key.id, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
