"""The worker side of batches in Redis: lease lines, record results exactly once, finalize.

Exactly once: a result is written with HSETNX keyed by custom_id, in the same script that bumps
the counts, so a line run twice (its worker died after the call, or lost its lease) is still
recorded once. A lease is `idx → worker id`; the sweep hands the lines of a worker whose
heartbeat key expired back to the queue. Key names: workers/protocol.py.
"""

import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import orjson
from redis.asyncio import Redis
from redis.exceptions import WatchError

from settings.config import FILE_EXPIRY_MAX_S
from workers.protocol import (
    BATCH_ACTIVE_KEY,
    BATCH_TERMINAL,
    BYTES_PER_TOKEN,
    CHARGE_LUA,
    DELETE_FILE_LUA,
    FILES_EXPIRING_KEY,
    KEY_LIMITS_LUA,
    BatchLine,
    BatchSpec,
    FileRecord,
    batch_key,
    batch_part_key,
    file_content_key,
    file_meta_key,
    owner_file_bytes_key,
    owner_files_key,
    owner_queued_lines_key,
    worker_heartbeat_key,
)

# Take up to n lines of a running batch, never more than `cap` leased across the whole pool,
# charging each to its key's limits like a live request (when ARGV[4] is '1'): one request per
# minute and per day, its estimated tokens per minute, its batch share of the per-minute limits
# (settings.batch_rate_share). The first line a limit refuses stays queued and the key's batches
# pause until that window ends (the pause key), instead of failing: the batch paces itself.
# A line bigger than the key's whole tokens-per-minute limit can never be charged; it is leased
# uncharged and the worker fails it with a 429, as a live request would be.
# KEYS: 1 batch, 2 pending, 3 leases, 4 lines, 5 the owner's key record, 6 its pause key, 7-9 its
# requests / tokens / requests-day counters. ARGV: 1 n, 2 worker id, 3 cap, 4 charge '1'|'0',
# 5 tier defaults JSON, 6-8 counter TTLs ms, 9-11 ms until each window ends, 12 batch share,
# 13 bytes per token. Returns {state, ...} with state 'ok', 'paused', 'revoked' or 'closed',
# then (idx, line, tokens charged, too big 1|0) per leased line.
_CLAIM_LUA = CHARGE_LUA + KEY_LIMITS_LUA + """
local b = redis.call('HMGET', KEYS[1], 'status', 'stop')
if b[1] ~= 'in_progress' or (b[2] and b[2] ~= '') then return {'closed'} end
local limits = nil
if ARGV[4] == '1' then
  if redis.call('EXISTS', KEYS[6]) == 1 then return {'paused'} end
  local raw = redis.call('GET', KEYS[5])
  local record = raw and cjson.decode(raw)
  if not record or record.revoked == true then return {'revoked'} end
  limits = key_limits(record, ARGV[5])
end
local ttls = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}
local share = tonumber(ARGV[12])
local n = math.min(tonumber(ARGV[1]), tonumber(ARGV[3]) - redis.call('HLEN', KEYS[3]))
local out = {'ok'}
for _ = 1, n do
  local idx = redis.call('LINDEX', KEYS[2], 0)
  if not idx then break end
  local line = redis.call('HGET', KEYS[4], idx) or ''
  local cost, big = 0, 0
  if limits then
    cost = math.ceil(#line / tonumber(ARGV[13]))
    if cost > limits[2] then
      cost, big = 0, 1
    else
      local mine = {math.max(1, math.floor(limits[1] * share)),
                    math.max(cost, math.floor(limits[2] * share)), limits[3]}
      local charged = charge(7, mine, ttls, {1, cost, 1})
      if charged[1] == 0 then
        redis.call('SET', KEYS[6], '1', 'PX', math.max(tonumber(ARGV[8 + charged[2]]), 1))
        out[1] = 'paused'
        break
      end
    end
  end
  redis.call('LPOP', KEYS[2])
  redis.call('HSET', KEYS[3], idx, ARGV[2])
  out[#out + 1] = idx
  out[#out + 1] = line
  out[#out + 1] = cost
  out[#out + 1] = big
end
return out
"""

# Record one result: -2 batch no longer accepts results, -1 already recorded, else lines left.
# A new result takes its line off the owner's queued lines (KEYS[4]).
_RECORD_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'in_progress' and status ~= 'cancelling' then return -2 end
if redis.call('HGET', KEYS[3], ARGV[4]) == ARGV[5] then redis.call('HDEL', KEYS[3], ARGV[4]) end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return -1 end
if redis.call('DECR', KEYS[4]) < 0 then redis.call('SET', KEYS[4], 0) end
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

# Stop a running batch for a reason (ARGV[1]): 'expire' (its window passed) or 'revoked' (its
# key was revoked: it ends as cancelled).
_STOP_LUA = """
local b = redis.call('HMGET', KEYS[1], 'status', 'stop')
if b[1] ~= 'in_progress' or (b[2] and b[2] ~= '') then return 0 end
redis.call('HSET', KEYS[1], 'stop', ARGV[1])
if ARGV[1] == 'revoked' then redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[2]) end
return 1
"""

_PARTS: tuple[Literal["lines", "pending", "leases", "results", "attempts"], ...] = (
    "lines", "pending", "leases", "results", "attempts")
_UNRUN = {"cancel": ("batch_cancelled", "The batch was cancelled before this request ran."),
          "expire": ("batch_expired", "The batch expired before this request could run."),
          "revoked": ("key_revoked", "The batch's API key was revoked before this request ran.")}
_FINAL = {"cancel": "cancelled", "expire": "expired", "revoked": "cancelled"}
# Due files the expiry sweep deletes per call (the rest on the next one).
_EXPIRE_FILES_PER_SWEEP = 200


class Leased(NamedTuple):
    """A line a claim leased to this worker, and what it charged to the key's limits."""

    idx: int
    line: BatchLine
    tokens_charged: int  # the estimate put on tokens-per-minute (0: nothing charged)
    too_big: bool  # more tokens than the key's whole per-minute limit: to be failed with a 429


@dataclass
class Claim:
    """What one claim took, and why it took no more ('paused': the key's limits; 'revoked')."""

    leased: list[Leased]
    state: str = "ok"


@dataclass(frozen=True)
class KeyBudget:
    """How a claim charges the limits of the key that owns a batch (workers/batch_limits.py)."""

    record_key: str  # the key's record (api_key_record_key)
    pause_key: str
    counters: tuple[str, str, str]  # requests / tokens / requests-day, in the current windows
    ttls_ms: tuple[int, int, int]
    resets_ms: tuple[int, int, int]  # until each of those windows ends
    tier_defaults: bytes  # {"free": [rpm, tpm, rpd], "pro": [...]}
    share: float  # of the per-minute limits, for batch lines


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

    def __init__(self, redis: Redis, worker_id: str, file_expiry_s: int = FILE_EXPIRY_MAX_S) -> None:
        self._redis = redis
        self.worker_id = worker_id
        self._file_expiry_s = file_expiry_s  # output files, unless the batch asked otherwise
        self._claim = redis.register_script(_CLAIM_LUA)
        self._record = redis.register_script(_RECORD_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._reclaim = redis.register_script(_RECLAIM_LUA)
        self._begin_finalize = redis.register_script(_BEGIN_FINALIZE_LUA)
        self._stop = redis.register_script(_STOP_LUA)
        self._delete_file = redis.register_script(DELETE_FILE_LUA)

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

    async def claim(self, batch_id: str, n: int, cap: int, budget: KeyBudget | None = None) -> Claim:
        """Lease up to n lines of a running batch, charging each to `budget` (None: no limits)."""
        keys = [batch_key(batch_id), *(batch_part_key(batch_id, p) for p in ("pending", "leases", "lines"))]
        if budget is None:
            keys += [batch_key(batch_id)] * 5  # unread: nothing is charged
            args: list[Any] = [n, self.worker_id, cap, "0", b"{}", 0, 0, 0, 0, 0, 0, 1, BYTES_PER_TOKEN]
        else:
            keys += [budget.record_key, budget.pause_key, *budget.counters]
            args = [n, self.worker_id, cap, "1", budget.tier_defaults, *budget.ttls_ms, *budget.resets_ms,
                    budget.share, BYTES_PER_TOKEN]
        flat = await self._claim(keys=keys, args=args)
        leased = [Leased(int(flat[i]), BatchLine.model_validate_json(flat[i + 1]), int(flat[i + 2]),
                         bool(int(flat[i + 3]))) for i in range(1, len(flat), 4)]
        return Claim(leased, flat[0].decode() if isinstance(flat[0], bytes) else str(flat[0]))

    async def record(self, spec: BatchSpec, idx: int, custom_id: str, line: bytes,
                     kind: Literal["completed", "failed"], usage: dict[str, Any] | None = None) -> int:
        """Record a line's result (and its token usage) once; returns lines left (-1 duplicate,
        -2 batch closed)."""
        value = b"%d %s %s" % (idx, b"o" if kind == "completed" else b"e", line)
        tokens = [int((usage or {}).get(name) or 0) for name in ("prompt_tokens", "completion_tokens")]
        keys = [batch_key(spec.id), batch_part_key(spec.id, "results"), batch_part_key(spec.id, "leases"),
                owner_queued_lines_key(spec.owner)]
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
        return bool(await self._stop(keys=[batch_key(batch_id)], args=["expire", int(time.time())]))

    async def stop_revoked(self, batch_id: str) -> bool:
        """Stop a batch whose key was revoked (it ends as `cancelled`; unrun lines: key_revoked)."""
        return bool(await self._stop(keys=[batch_key(batch_id)], args=["revoked", int(time.time())]))

    async def expire_files(self, now_s: float) -> int:
        """Delete the files whose expiry has passed (a few hundred per call); returns how many."""
        due = [i.decode() for i in await self._redis.zrangebyscore(FILES_EXPIRING_KEY, "-inf", int(now_s), start=0,
                                                                   num=_EXPIRE_FILES_PER_SWEEP)]
        if not due:
            return 0
        raws = await self._redis.mget([file_meta_key(i) for i in due])
        deleted = 0
        for file_id, raw in zip(due, raws, strict=True):
            if raw is None:
                await self._redis.zrem(FILES_EXPIRING_KEY, file_id)  # deleted meanwhile
                continue
            record = FileRecord.model_validate_json(raw)
            keys = [owner_files_key(record.owner), file_meta_key(file_id), file_content_key(file_id),
                    owner_file_bytes_key(record.owner), FILES_EXPIRING_KEY]
            deleted += int(await self._delete_file(keys=keys, args=[file_id, record.bytes]))
        return deleted

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
        final = _FINAL.get(stop, "completed")
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
                expires_at = now + (spec.output_expires_after_s or self._file_expiry_s)
                for kind, lines in files:
                    record = FileRecord(id="file-" + secrets.token_hex(12), owner=spec.owner, created_at=now,
                                        bytes=sum(len(x) + 1 for x in lines), purpose="batch_output",
                                        filename=f"{batch_id}_{kind}.jsonl", expires_at=expires_at)
                    pipe.set(file_meta_key(record.id), record.model_dump_json())
                    pipe.set(file_content_key(record.id), b"\n".join(lines) + b"\n")
                    pipe.zadd(owner_files_key(spec.owner), {record.id: now})
                    pipe.zadd(FILES_EXPIRING_KEY, {record.id: expires_at})
                    # Results count against the quota but are never refused: the work is done.
                    pipe.incrby(owner_file_bytes_key(spec.owner), record.bytes)
                    fields[f"{kind}_file_id"] = record.id
                if unrun:
                    pipe.hincrby(batch_key(batch_id), "failed", len(unrun))
                    # Off the owner's queued lines (a stray negative is read as 0 by the API).
                    pipe.decrby(owner_queued_lines_key(spec.owner), len(unrun))
                pipe.hset(batch_key(batch_id), mapping=fields)
                pipe.srem(BATCH_ACTIVE_KEY, batch_id)
                pipe.delete(*(batch_part_key(batch_id, p) for p in _PARTS))
                await pipe.execute()
            except WatchError:
                return False
        return True
