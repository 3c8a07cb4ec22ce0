"""The worker side of batches in Redis: lease lines, record results exactly once, finalize.

Exactly once: a result is written with HSETNX keyed by custom_id, in the same script that bumps
the counts, so a line run twice (its worker died after the call, or lost its lease) is still
recorded once. A lease is `idx → worker id`; the sweep hands the lines of a worker whose
heartbeat key expired back to the queue. Key names: workers/protocol.py.
"""

import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from redis.asyncio import Redis
from redis.exceptions import WatchError

from workers.protocol import (
    BATCH_ACTIVE_KEY,
    BATCH_TERMINAL,
    BatchLine,
    BatchSpec,
    FileRecord,
    batch_key,
    batch_part_key,
    file_content_key,
    file_meta_key,
    owner_file_bytes_key,
    owner_files_key,
    worker_heartbeat_key,
)

# Take up to n lines of a running batch, never more than `cap` leased across the whole pool.
_CLAIM_LUA = """
local b = redis.call('HMGET', KEYS[1], 'status', 'stop')
if b[1] ~= 'in_progress' or (b[2] and b[2] ~= '') then return {} end
local n = math.min(tonumber(ARGV[1]), tonumber(ARGV[3]) - redis.call('HLEN', KEYS[3]))
local out = {}
for _ = 1, n do
  local idx = redis.call('LPOP', KEYS[2])
  if not idx then break end
  redis.call('HSET', KEYS[3], idx, ARGV[2])
  out[#out + 1] = idx
  out[#out + 1] = redis.call('HGET', KEYS[4], idx)
end
return out
"""

# Record one result: -2 batch no longer accepts results, -1 already recorded, else lines left.
_RECORD_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'in_progress' and status ~= 'cancelling' then return -2 end
if redis.call('HGET', KEYS[3], ARGV[4]) == ARGV[5] then redis.call('HDEL', KEYS[3], ARGV[4]) end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return -1 end
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[7])
local c = redis.call('HMGET', KEYS[1], 'completed', 'failed', 'total')
return tonumber(c[3]) - tonumber(c[1]) - tonumber(c[2])
"""

# Give a leased line back: to the front (worker stopping) or, counting a try, to the back (retry).
# Returns -1 if the lease is not ours any more, 0 if out of tries (record the failure), else 1.
_RELEASE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return -1 end
if ARGV[3] ~= '0' then
  if redis.call('HINCRBY', KEYS[3], ARGV[1], 1) >= tonumber(ARGV[3]) then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""

# Re-queue leases (ARGV: idx, holder pairs) that still belong to the holder named.
_RECLAIM_LUA = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('LPUSH', KEYS[2], ARGV[i])
    n = n + 1
  end
end
return n
"""

# Become the one finalizer: when every line has a result, or (stopping) no line is leased any
# more; or take over from a finalizer that died (ARGV[3]).
_BEGIN_FINALIZE_LUA = """
local f = redis.call('HMGET', KEYS[1], 'status', 'stop', 'completed', 'failed', 'total', 'finalizer')
if f[1] == 'finalizing' then
  if ARGV[3] ~= '' and f[6] == ARGV[3] then redis.call('HSET', KEYS[1], 'finalizer', ARGV[1]) return 1 end
  return 0
end
if f[1] ~= 'in_progress' and f[1] ~= 'cancelling' then return 0 end
if (f[2] or '') == '' then
  if tonumber(f[3]) + tonumber(f[4]) < tonumber(f[5]) then return 0 end
elseif redis.call('HLEN', KEYS[2]) > 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'finalizing', 'finalizing_at', ARGV[2], 'finalizer', ARGV[1])
return 1
"""

_EXPIRE_LUA = """
local b = redis.call('HMGET', KEYS[1], 'status', 'stop')
if b[1] ~= 'in_progress' or (b[2] and b[2] ~= '') then return 0 end
redis.call('HSET', KEYS[1], 'stop', 'expire')
return 1
"""

_PARTS: tuple[Literal["lines", "pending", "leases", "results", "attempts"], ...] = (
    "lines", "pending", "leases", "results", "attempts")
_UNRUN = {"cancel": ("batch_cancelled", "The batch was cancelled before this request ran."),
          "expire": ("batch_expired", "The batch expired before this request could run.")}


@dataclass
class BatchView:
    """What a runner needs to know about one active batch on each tick."""

    spec: BatchSpec
    status: str
    stop: str
    finalizer: str
    remaining: int


def output_line(custom_id: str, request_id: str, status_code: int, body: object) -> bytes:
    """One line of an output or error file, as OpenAI writes them."""
    return orjson.dumps({"id": "batch_req_" + secrets.token_hex(12), "custom_id": custom_id,
                         "response": {"status_code": status_code, "request_id": request_id, "body": body},
                         "error": None})


class BatchStore:
    """Redis operations of one worker's batch runner."""

    def __init__(self, redis: Redis, worker_id: str) -> None:
        self._redis = redis
        self.worker_id = worker_id
        self._claim = redis.register_script(_CLAIM_LUA)
        self._record = redis.register_script(_RECORD_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._reclaim = redis.register_script(_RECLAIM_LUA)
        self._begin_finalize = redis.register_script(_BEGIN_FINALIZE_LUA)
        self._expire = redis.register_script(_EXPIRE_LUA)

    async def active(self) -> list[BatchView]:
        """Every non-terminal batch (terminal leftovers are dropped from the active set)."""
        ids = sorted(i.decode() for i in await self._redis.smembers(BATCH_ACTIVE_KEY))  # type: ignore[misc]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hmget(batch_key(batch_id), ["spec", "status", "stop", "finalizer", "total", "completed",
                                                 "failed"])
            rows = await pipe.execute()
        views: list[BatchView] = []
        for batch_id, row in zip(ids, rows, strict=True):
            spec_raw, status, stop, finalizer, total, completed, failed = (v.decode() if v else "" for v in row)
            if not spec_raw or status in BATCH_TERMINAL:
                await self._redis.srem(BATCH_ACTIVE_KEY, batch_id)  # type: ignore[misc]
                continue
            remaining = int(total or 0) - int(completed or 0) - int(failed or 0)
            views.append(BatchView(BatchSpec.model_validate_json(spec_raw), status, stop, finalizer, remaining))
        return views

    async def claim(self, batch_id: str, n: int, cap: int) -> list[tuple[int, BatchLine]]:
        """Lease up to n lines of a running batch."""
        keys = [batch_key(batch_id), *(batch_part_key(batch_id, p) for p in ("pending", "leases", "lines"))]
        flat = await self._claim(keys=keys, args=[n, self.worker_id, cap])
        return [(int(flat[i]), BatchLine.model_validate_json(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def record(self, batch_id: str, idx: int, custom_id: str, line: bytes,
                     kind: Literal["completed", "failed"], usage: dict[str, Any] | None = None) -> int:
        """Record a line's result (and its token usage) once; returns lines left (-1 duplicate,
        -2 batch closed)."""
        value = b"%d %s %s" % (idx, b"o" if kind == "completed" else b"e", line)
        tokens = [int((usage or {}).get(name) or 0) for name in ("prompt_tokens", "completion_tokens")]
        keys = [batch_key(batch_id), batch_part_key(batch_id, "results"), batch_part_key(batch_id, "leases")]
        left: int = await self._record(keys=keys, args=[custom_id, value, kind, idx, self.worker_id, *tokens])
        return left

    async def release(self, batch_id: str, idx: int, retry_max_attempts: int = 0) -> int:
        """Give a lease back (retry_max_attempts > 0: count a try; 0 means out of tries)."""
        keys = [batch_part_key(batch_id, p) for p in ("leases", "pending", "attempts")]
        outcome: int = await self._release(keys=keys, args=[idx, self.worker_id, retry_max_attempts])
        return outcome

    async def reclaim(self, batch_id: str, running_here: set[int]) -> int:
        """Re-queue lines leased by workers whose heartbeat expired, and leases of this worker that
        no local task holds any more (a release that failed); returns how many."""
        leases: dict[bytes, bytes] = await self._redis.hgetall(batch_part_key(batch_id, "leases"))  # type: ignore[misc]
        me = self.worker_id.encode()
        alive: dict[bytes, bool] = {me: True}
        stale: list[bytes] = []
        for idx, holder in leases.items():
            if holder not in alive:
                alive[holder] = await self.alive(holder.decode())
            if not alive[holder] or (holder == me and int(idx) not in running_here):
                stale += [idx, holder]
        if not stale:
            return 0
        keys = [batch_part_key(batch_id, "leases"), batch_part_key(batch_id, "pending")]
        moved: int = await self._reclaim(keys=keys, args=stale)
        return moved

    async def alive(self, worker_id: str) -> bool:
        """Whether a worker still heart-beats."""
        return bool(await self._redis.exists(worker_heartbeat_key(worker_id)))

    async def expire(self, batch_id: str) -> bool:
        """Stop a batch whose completion window has passed (it ends as `expired`)."""
        return bool(await self._expire(keys=[batch_key(batch_id)]))

    async def fail_stale_validation(self, batch_id: str) -> None:
        """An API process died while validating: the batch fails, nothing ran."""
        errors = {"object": "list", "data": [{"code": "validation_interrupted", "param": None, "line": None,
                                              "message": "Validation was interrupted; please create the batch again."}]}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(batch_key(batch_id), mapping={"status": "failed", "failed_at": int(time.time()),
                                                    "errors": orjson.dumps(errors)})
            pipe.delete(*(batch_part_key(batch_id, p) for p in _PARTS))  # lines half-written, if any
            await pipe.execute()

    async def begin_finalize(self, batch_id: str, take_over_from: str = "") -> bool:
        """Claim the finalization of a batch whose lines are done (or that is stopping)."""
        keys = [batch_key(batch_id), batch_part_key(batch_id, "leases")]
        return bool(await self._begin_finalize(keys=keys, args=[self.worker_id, int(time.time()), take_over_from]))

    async def finalize(self, spec: BatchSpec, stop: str) -> bool:
        """Write the output and error files and end the batch, atomically; False if another worker did."""
        batch_id = spec.id
        results: dict[bytes, bytes] = await self._redis.hgetall(batch_part_key(batch_id, "results"))  # type: ignore[misc]
        total = int(await self._redis.hget(batch_key(batch_id), "total") or 0)  # type: ignore[misc]
        ordered: list[tuple[int, bytes, bytes]] = []
        for value in results.values():
            idx, marker, line = value.split(b" ", 2)
            ordered.append((int(idx), marker, line))
        ordered.sort()
        out = [line for _, marker, line in ordered if marker == b"o"]
        err = [line for _, marker, line in ordered if marker == b"e"]
        unrun = sorted(set(range(total)) - {idx for idx, _, _ in ordered})
        if unrun:
            raws = await self._redis.hmget(batch_part_key(batch_id, "lines"), [str(i) for i in unrun])  # type: ignore[misc]
            code, message = _UNRUN.get(stop, ("batch_incomplete", "The request did not run."))
            for raw in raws:
                custom_id = BatchLine.model_validate_json(raw).custom_id
                err.append(orjson.dumps({"id": "batch_req_" + secrets.token_hex(12), "custom_id": custom_id,
                                         "response": None, "error": {"code": code, "message": message}}))
        final = {"cancel": "cancelled", "expire": "expired"}.get(stop, "completed")
        files = [(kind, lines) for kind, lines in (("output", out), ("error", err)) if lines]
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(batch_key(batch_id))
                status, finalizer = await pipe.hmget(batch_key(batch_id), ["status", "finalizer"])  # type: ignore[misc]
                if status != b"finalizing" or finalizer != self.worker_id.encode():
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                now = int(time.time())
                fields: dict[str, str | int] = {"status": final, f"{final}_at": now, "finalizer": ""}
                for kind, lines in files:
                    record = FileRecord(id="file-" + secrets.token_hex(12), owner=spec.owner, created_at=now,
                                        bytes=sum(len(x) + 1 for x in lines), purpose="batch_output",
                                        filename=f"{batch_id}_{kind}.jsonl")
                    pipe.set(file_meta_key(record.id), record.model_dump_json())
                    pipe.set(file_content_key(record.id), b"\n".join(lines) + b"\n")
                    pipe.zadd(owner_files_key(spec.owner), {record.id: now})
                    # Results count against the quota but are never refused: the work is done.
                    pipe.incrby(owner_file_bytes_key(spec.owner), record.bytes)
                    fields[f"{kind}_file_id"] = record.id
                if unrun:
                    pipe.hincrby(batch_key(batch_id), "failed", len(unrun))
                pipe.hset(batch_key(batch_id), mapping=fields)
                pipe.srem(BATCH_ACTIVE_KEY, batch_id)
                pipe.delete(*(batch_part_key(batch_id, p) for p in _PARTS))
                await pipe.execute()
            except WatchError:
                return False
        return True
