"""Files and batch records in Redis, as the API reads and writes them (key names: workers/protocol.py)."""

import secrets
import time
from typing import Any

import orjson
from redis.asyncio import Redis

from api.batches.validate import LineError
from api.errors import OpenAIError
from api.ids import BATCH_ID, FILE_ID, quoted, well_formed
from workers.protocol import (
    BATCH_ACTIVE_KEY,
    DELETE_FILE_LUA,
    FILES_EXPIRING_KEY,
    BatchLine,
    BatchSpec,
    FileRecord,
    batch_key,
    batch_part_key,
    file_content_key,
    file_meta_key,
    owner_batches_key,
    owner_file_bytes_key,
    owner_files_key,
    owner_queued_lines_key,
)

# Lines are written in chunks so no single command carries a 200 MB payload.
_LINES_PER_WRITE = 1000

# Flip a validated batch to in_progress and queue every line index, unless it was cancelled
# meanwhile (returns 0) or its lines would take the owner's queued lines past the cap (returns
# -1 - lines queued now). One script: a worker can never see a half-loaded batch, and two
# batches created at once cannot both slip under the cap.
_START_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'validating' then return 0 end
local total = tonumber(ARGV[1])
local queued = math.max(tonumber(redis.call('GET', KEYS[4]) or '0'), 0)
if queued + total > tonumber(ARGV[4]) then return -1 - queued end
redis.call('SET', KEYS[4], queued + total)
for i = 0, total - 1 do redis.call('RPUSH', KEYS[2], i) end
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[2], 'total', total)
redis.call('SADD', KEYS[3], ARGV[3])
return 1
"""

# Cancel: only a batch that is still running can be cancelled; workers finish the job.
_CANCEL_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'validating' and status ~= 'in_progress' then return status end
redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1], 'stop', 'cancel')
redis.call('SADD', KEYS[2], ARGV[2])
return 'cancelling'
"""

# Store an upload and count it against the owner's quota, or refuse it, in one step:
# returns -(bytes in use + 1) when it does not fit.
_CREATE_FILE_LUA = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return -(used + 1) end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6])
if ARGV[7] ~= '' then redis.call('ZADD', KEYS[5], ARGV[7], ARGV[6]) end
return used + tonumber(ARGV[1])
"""

_TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
               "cancelled_at")


def _now() -> int:
    return int(time.time())


def not_found(kind: str, object_id: str) -> OpenAIError:
    """The one answer for an id that is malformed, unknown or another key's: nothing tells them apart."""
    return OpenAIError(404, f"No such {kind}{quoted(object_id)}.", code=f"{kind}_not_found", param="id")


def file_object(record: FileRecord) -> dict[str, Any]:
    """The OpenAI file object."""
    return {"id": record.id, "object": "file", "bytes": record.bytes, "created_at": record.created_at,
            "filename": record.filename, "purpose": record.purpose, "status": "processed",
            "status_details": None, "expires_at": record.expires_at}


def _expired(record: FileRecord, now: int) -> bool:
    # Gone for its owner the moment it is due, whenever the workers' sweep deletes it.
    return record.expires_at is not None and record.expires_at <= now


async def create_file(redis: Redis, owner: str, filename: str, purpose: str, content: bytes,
                      quota_bytes: int, expires_after_s: int | None = None) -> FileRecord:
    """Store an uploaded file and its owner's index, within the owner's storage quota; it expires
    `expires_after_s` after its creation (None: kept until deleted)."""
    now = _now()
    record = FileRecord(id="file-" + secrets.token_hex(12), owner=owner, bytes=len(content), created_at=now,
                        filename=filename, purpose=purpose,
                        expires_at=None if expires_after_s is None else now + expires_after_s)
    create = redis.register_script(_CREATE_FILE_LUA)
    keys = [owner_file_bytes_key(owner), file_meta_key(record.id), file_content_key(record.id),
            owner_files_key(owner), FILES_EXPIRING_KEY]
    stored = await create(keys=keys, args=[len(content), quota_bytes, record.model_dump_json(), content,
                                           record.created_at, record.id,
                                           "" if record.expires_at is None else record.expires_at])
    if stored < 0:
        raise OpenAIError(400, f"Storing this file would exceed your file storage limit of {quota_bytes} bytes "
                               f"({-stored - 1} in use); delete files you have collected.",
                          code="storage_limit_exceeded", param="file")
    return record


async def get_file(redis: Redis, owner: str, file_id: str) -> FileRecord:
    """The caller's file; 404 when it does not exist or belongs to another key."""
    if not well_formed(FILE_ID, file_id):
        raise not_found("file", file_id)
    raw = await redis.get(file_meta_key(file_id))
    record = FileRecord.model_validate_json(raw) if raw else None
    if record is None or record.owner != owner or _expired(record, _now()):
        raise not_found("file", file_id)
    return record


async def file_content(redis: Redis, owner: str, file_id: str) -> bytes:
    """The caller's file bytes."""
    await get_file(redis, owner, file_id)
    content: bytes | None = await redis.get(file_content_key(file_id))
    if content is None:
        raise not_found("file", file_id)
    return content


async def delete_file(redis: Redis, owner: str, file_id: str) -> None:
    """Delete the caller's file (running batches hold their own copy of the lines)."""
    record = await get_file(redis, owner, file_id)
    delete = redis.register_script(DELETE_FILE_LUA)
    await delete(keys=[owner_files_key(owner), file_meta_key(file_id), file_content_key(file_id),
                       owner_file_bytes_key(owner), FILES_EXPIRING_KEY], args=[file_id, record.bytes])


async def list_files(redis: Redis, owner: str, purpose: str | None, limit: int, after: str | None,
                     order: str) -> tuple[list[FileRecord], bool]:
    """The caller's files, newest first unless order='asc'; (page, has_more)."""
    ids = await _page_ids(redis, owner_files_key(owner), after, order)
    raws = await redis.mget([file_meta_key(i) for i in ids]) if ids else []
    now = _now()
    records = [record for r in raws if r and not _expired(record := FileRecord.model_validate_json(r), now)]
    if purpose:
        records = [r for r in records if r.purpose == purpose]
    return records[:limit], len(records) > limit


async def _page_ids(redis: Redis, index: str, after: str | None, order: str) -> list[str]:
    ids = [i.decode() for i in await redis.zrange(index, 0, -1)]
    if order != "asc":
        ids.reverse()
    if after is not None and after in ids:
        ids = ids[ids.index(after) + 1:]
    return ids


async def create_batch(redis: Redis, spec: BatchSpec) -> None:
    """Record a new batch in `validating`."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(batch_key(spec.id), mapping={"spec": spec.model_dump_json(), "status": "validating",
                                               "total": 0, "completed": 0, "failed": 0})
        pipe.zadd(owner_batches_key(spec.owner), {spec.id: spec.created_at})
        # Active from the start: if this process dies mid-validation a worker fails the batch later.
        pipe.sadd(BATCH_ACTIVE_KEY, spec.id)
        await pipe.execute()


async def queued_lines(redis: Redis, owner: str) -> int:
    """Lines of the owner's unfinished batches that have not finished yet."""
    return max(int(await redis.get(owner_queued_lines_key(owner)) or 0), 0)


def over_queued_cap(count: int, queued: int, cap: int) -> LineError:
    """The batch's error when its lines would take the key past its cap on queued lines."""
    return LineError("queued_lines_limit_exceeded",
                     f"This batch has {count:,} requests and your key has {queued:,} queued in unfinished "
                     f"batches; at most {cap:,} may be queued at once. Try again when running batches have "
                     "progressed, or split the file.")


async def start_batch(redis: Redis, spec: BatchSpec, lines: list[BatchLine], cap: int) -> LineError | None:
    """Load the validated lines and hand the batch to the workers, within the owner's cap on queued
    lines; the error that failed it, or None (also when it was cancelled meanwhile)."""
    batch_id = spec.id
    lines_key = batch_part_key(batch_id, "lines")
    for start in range(0, len(lines), _LINES_PER_WRITE):
        chunk = lines[start:start + _LINES_PER_WRITE]
        await redis.hset(lines_key, mapping={str(start + i): line.model_dump_json()  # type: ignore[misc]
                                             for i, line in enumerate(chunk)})
    start_lua = redis.register_script(_START_LUA)
    started = int(await start_lua(keys=[batch_key(batch_id), batch_part_key(batch_id, "pending"), BATCH_ACTIVE_KEY,
                                        owner_queued_lines_key(spec.owner)],
                                  args=[len(lines), _now(), batch_id, cap]))
    if started != 1:
        await redis.delete(lines_key)  # a cancelled batch is finalized by the workers, with no lines
    return over_queued_cap(len(lines), -1 - started, cap) if started < 0 else None


async def fail_batch(redis: Redis, batch_id: str, errors: list[LineError], error_count: int) -> None:
    """Validation failed: record the per-line errors; nothing ran."""
    data = [{"code": e.code, "message": e.message, "param": e.param, "line": e.line} for e in errors]
    if error_count > len(errors):
        data.append({"code": "too_many_errors", "param": None, "line": None,
                     "message": f"{error_count - len(errors)} more lines are invalid (not listed)."})
    await redis.hset(batch_key(batch_id), mapping={  # type: ignore[misc]
        "status": "failed", "failed_at": _now(), "errors": orjson.dumps({"object": "list", "data": data})})


async def get_batch(redis: Redis, owner: str, batch_id: str) -> dict[str, Any]:
    """The caller's batch as an OpenAI batch object; 404 for unknown or foreign ids."""
    if not well_formed(BATCH_ID, batch_id):
        raise not_found("batch", batch_id)
    fields: dict[bytes, bytes] = await redis.hgetall(batch_key(batch_id))  # type: ignore[misc]
    spec = BatchSpec.model_validate_json(fields[b"spec"]) if b"spec" in fields else None
    if spec is None or spec.owner != owner:
        raise not_found("batch", batch_id)
    return batch_object(spec, {k.decode(): v.decode() for k, v in fields.items()})


async def list_batches(redis: Redis, owner: str, limit: int, after: str | None) -> tuple[list[dict[str, Any]], bool]:
    """The caller's batches, newest first; (page, has_more)."""
    ids = await _page_ids(redis, owner_batches_key(owner), after, "desc")
    page: list[dict[str, Any]] = []
    for batch_id in ids[:limit]:
        try:
            page.append(await get_batch(redis, owner, batch_id))
        except OpenAIError:
            continue  # deleted meanwhile
    return page, len(ids) > limit


async def cancel_batch(redis: Redis, owner: str, batch_id: str) -> dict[str, Any]:
    """Ask the workers to stop a batch; idempotent while it is cancelling or cancelled."""
    await get_batch(redis, owner, batch_id)
    cancel_lua = redis.register_script(_CANCEL_LUA)
    outcome = await cancel_lua(keys=[batch_key(batch_id), BATCH_ACTIVE_KEY], args=[_now(), batch_id])
    status = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
    if status not in ("cancelling", "cancelled"):
        raise OpenAIError(400, f"Cannot cancel a batch that is already {status}.", code="invalid_request",
                          param="batch_id")
    return await get_batch(redis, owner, batch_id)


def batch_object(spec: BatchSpec, fields: dict[str, str]) -> dict[str, Any]:
    """Render the OpenAI batch object from the record's spec and mutable fields."""
    def stamp(name: str) -> int | None:
        value = fields.get(name)
        return int(value) if value else None

    errors = orjson.loads(fields["errors"]) if fields.get("errors") else None
    return {
        "id": spec.id, "object": "batch", "endpoint": spec.endpoint, "errors": errors,
        "input_file_id": spec.input_file_id, "completion_window": spec.completion_window,
        "status": fields.get("status", "validating"),
        "output_file_id": fields.get("output_file_id") or None, "error_file_id": fields.get("error_file_id") or None,
        "created_at": spec.created_at, "expires_at": spec.expires_at,
        **{name: stamp(name) for name in _TIMESTAMPS},
        "request_counts": {"total": int(fields.get("total", 0)), "completed": int(fields.get("completed", 0)),
                           "failed": int(fields.get("failed", 0))},
        "metadata": spec.metadata,
        "usage": _usage(int(fields.get("input_tokens", 0)), int(fields.get("output_tokens", 0))),
    }


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """Token usage summed over the batch's completed lines, in OpenAI's batch usage shape."""
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
