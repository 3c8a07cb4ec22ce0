"""The contract between API processes and workers: job payload, reply events, Redis names,
and the rules both sides charge a key's limits and usage by.

Both sides import this module and nothing else of each other (the API never imports routing
or provider code).

Wire format of a reply message: ``<job_id> <event_type> <json payload>``. The job id and type
come first so the API can route a message without parsing it, and a ``chunk`` payload is the
OpenAI ``chat.completion.chunk`` JSON itself, written to the SSE stream byte for byte.
"""

import math
import time
import uuid
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The routing layer's shared state is named by the router itself (workers → router: the layers'
# own direction); what the API reads of it is re-exported here, the one module the API imports.
from router.keyspace import (
    LEARNED_CATALOG_KEY,
    LIVE_DEPLOYMENTS_KEY,
    LIVE_MODEL_CARDS_KEY,
    MODEL_PARK_PREFIX,
    PROVIDER_STATUS_KEY,
    DeploymentHealth,
    KeyCheck,
    LiveDeployment,
    ModelCard,
    ProviderStatus,
    catalog_refresh_lock_key,
    deployment_health_key,
    deployment_probe_key,
    key_quota_view,
    upstream_key_state_key,
)

# Answer shapes the API and the batch runner both build (the Responses API's output items).
from workers.response_shapes import (
    call_item,
    fill_response,
    message_item,
    new_id,
    output_items,
    reasoning_item,
    reasoning_text,
    status_of,
    text_part,
    usage_of,
)

__all__ = [
    "LEARNED_CATALOG_KEY", "LIVE_DEPLOYMENTS_KEY", "LIVE_MODEL_CARDS_KEY", "MODEL_PARK_PREFIX",
    "PROVIDER_STATUS_KEY", "DeploymentHealth", "KeyCheck", "LiveDeployment", "ModelCard", "ProviderStatus",
    "call_item", "catalog_refresh_lock_key", "deployment_health_key", "deployment_probe_key", "fill_response",
    "key_quota_view", "message_item", "new_id", "output_items", "reasoning_item", "reasoning_text", "status_of",
    "text_part", "upstream_key_state_key", "usage_of",
]

PROTOCOL_VERSION = 1

EventType = Literal["accepted", "start", "chunk", "done", "error"]
EVENT_TYPES: frozenset[str] = frozenset({"accepted", "start", "chunk", "done", "error"})
Tier = Literal["free", "pro"]

# --- Redis names. Every key and channel the gateway uses is built here, except those of the
# routing layer's shared state (router/keyspace.py, re-exported above).
KEY_PREFIX = "ff:"
# Workers subscribe to this channel for id-less wake-ups (and the job ids an API of an earlier
# release publishes on every enqueue); current APIs hand jobs over through ready_list_key.
WAKE_CHANNEL = "ff:wake"
WORKER_HEARTBEAT_PREFIX = "ff:worker:"
# Sorted set worker id → heartbeat expiry (unix ms), beside the heartbeat keys, so readiness
# and metrics find the live workers without scanning the whole keyspace.
WORKERS_KEY = "ff:workers"
# Hash worker id → its load record (WorkerLoad as JSON), rewritten a few times a second: one
# HGETALL tells an API process whether the pool can take another job soon (api/pool_load.py).
# Records carry their own expiry; a stopping worker deletes its field.
POOL_LOAD_KEY = "ff:pool:load"
# Sorted set API process id → when its presence lapses (unix ms), renewed with every read of
# the pool's load: how many API replicas share the room the workers publish.
API_REPLICAS_KEY = "ff:apis"
ARQ_JOB_FUNCTION = "chat_completion"


REPLY_CHANNEL_PREFIX = "ff:reply:"


def reply_channel(process_id: str) -> str:
    """Pub/sub channel on which one API process receives the events of all its jobs."""
    return f"{REPLY_CHANNEL_PREFIX}{process_id}"


def reply_channel_of(job_id: str) -> str | None:
    """The reply channel a job id names (new_job_id), or None for an id that names none."""
    process_id, dot, _ = job_id.partition(".")
    return reply_channel(process_id) if dot and process_id.isalnum() else None


def new_job_id(process_id: str) -> str:
    """A fresh job id that names the API process waiting for it: ``<process_id>.<uuid hex>``.

    The worker's claim script announces the job (the ``accepted`` event) on that process's
    reply channel in the same call that claims it, without reading the job's payload. The
    process id must be alphanumeric.
    """
    return f"{process_id}.{uuid.uuid4().hex}"


def ready_list_key(queue_name: str) -> str:
    """List beside arq's queue that hands each new job to exactly one idle worker (BLMPOP).

    arq's sorted set stays the record of queued jobs: a worker still claims a popped job there
    (SET NX on arq's in-progress key) before it calls upstream, and the slow scan of the sorted
    set picks up anything whose list entry was lost. See docs/architecture.md, "Pickup".
    """
    return f"{queue_name}:ready"


def ready_entry(job_id: str, payload: bytes) -> bytes:
    """One ready-list entry: the job id and its arq payload, so a pop needs no second read."""
    return job_id.encode() + b"\n" + payload


def split_ready_entry(entry: bytes) -> tuple[str, bytes]:
    """(job id, arq payload) of a ready-list entry."""
    job_id, _, payload = entry.partition(b"\n")
    return job_id.decode(errors="replace"), payload


def control_channel(worker_id: str) -> str:
    """Pub/sub channel on which one worker receives cancellations for the jobs it runs."""
    return f"ff:control:{worker_id}"


def worker_heartbeat_key(worker_id: str) -> str:
    """Key with a short TTL that exists while the worker is alive."""
    return f"{WORKER_HEARTBEAT_PREFIX}{worker_id}"


def api_key_record_key(key_hash: str) -> str:
    """Hash of an API key (sha256 hex) → its JSON record. The key itself is never stored."""
    return f"ff:apikey:{key_hash}"


API_KEY_INDEX = "ff:apikeys"  # set of key hashes, for listing
# Hash: key id → unix seconds of its last request. Apart from the record so the hot path
# never rewrites (and never races with an admin update of) the record itself.
API_KEY_LAST_USED = "ff:apikeys:last-used"


def api_key_id_key(key_id: str) -> str:
    """Key id → sha256 hex of the key, so admins can name a key without holding it."""
    return f"ff:apikey-id:{key_id}"


def rate_limit_key(subject: str, name: str, window_s: int, window_index: int) -> str:
    """Counter of one fixed rate-limit window; expires when the window ends."""
    return f"ff:rl:{subject}:{name}:{window_s}:{window_index}"


def usage_key(key_id: str, day: str) -> str:
    """Hash of one key's usage on one UTC day (YYYY-MM-DD): '<model>|<metric>' → count."""
    return f"ff:usage:{key_id}:{day}"


def stored_response_key(owner: str, response_id: str) -> str:
    """A Responses API answer kept for `previous_response_id` and retrieval: JSON, with a TTL.

    Named by its owner's key id, so another key's response simply does not exist.
    """
    return f"ff:response:{owner}:{response_id}"


def cancelled_job_key(job_id: str) -> str:
    """Set by the API when a caller left before the worker announced itself."""
    return f"ff:cancelled:{job_id}"


def key_streams_key(key_id: str) -> str:
    """Sorted set of one key's open streams (member → expiry unix ms), for its concurrency limit."""
    return f"ff:streams:{key_id}"


# The request id of the work in progress, bound by the API per request and by the worker per
# job (the job carries it), so every log line of either side names the request it belongs to.
REQUEST_ID: ContextVar[str | None] = ContextVar("freeference_request_id", default=None)




# --- Job payload
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatJob(_Model):
    """What the API enqueues for one chat completion."""

    version: int = PROTOCOL_VERSION
    job_id: str
    request_id: str
    reply_channel: str
    # The caller's JSON body minus gateway-only fields; forwarded upstream field by field.
    body: dict[str, Any]
    stream: bool
    # None / "auto" → route by intent; a capability id; or an exact model id (pro only).
    requested_model: str | None
    fallback_models: list[str] = Field(default_factory=list)
    intent_hint: Literal["code", "reasoning", "general"] | None = None
    key_id: str
    # "embeddings": a /v1/embeddings request (body: its input and options; never streamed).
    # Left out of a chat job's JSON, so a worker of an earlier release still reads chat jobs.
    endpoint: Literal["chat", "embeddings"] = Field(default="chat", exclude_if=lambda value: value == "chat")
    # None when the job was queued by the admission script, before the API read the key's
    # record (api/intake.py). Workers do not route by tier: the API enforced it already.
    tier: Tier | None = None
    deadline_unix_ms: int


class WorkerLoad(_Model):
    """One worker's load as it publishes it (workers/capacity.py); the API decides admission by it."""

    model_config = ConfigDict(extra="ignore")  # a newer worker's extra fields do not break an older API

    running: int
    # Jobs it could take on by its measured capacity (0: full). A late event loop does not count:
    # it delays pickup by moments, it does not make the pool full.
    room: int
    # Jobs it started and finished per second, recently: how fast its queue moves.
    started_per_s: float
    finished_per_s: float
    lag_ms: float
    # Its loop is late beyond its limit: it takes no job now, and its room is only what it gets
    # through at the rate it has been starting jobs.
    lagging: bool = False
    cpu: float  # share of one core
    rss_kb: int
    expires_unix_ms: int


# --- Events (payloads of reply messages)
class RouteInfo(_Model):
    model: str
    provider: str
    attempts: int
    intent: str | None = None
    intent_reason: str | None = None
    # The candidates ranked before the one that answered and why they did not (`x-freeference-route`):
    # "<deployment>=<reason>, ..." with reasons such as capability:tools, window, breaker, cooling,
    # quota, hedge, failed:<kind>. Short, ASCII, never any request text.
    skipped: str | None = None


class AcceptedEvent(_Model):
    worker_id: str


def accepted_payload(worker_id: str) -> bytes:
    """The `accepted` event's payload: which worker runs the job (for liveness and cancels)."""
    return AcceptedEvent(worker_id=worker_id).model_dump_json().encode()


class StartEvent(_Model):
    route: RouteInfo


class AttemptFailure(_Model):
    """One failed upstream attempt, for metrics (no message: it may quote the prompt)."""

    provider: str
    deployment: str
    reason: str


class HedgeRecord(_Model):
    """A hedge the request started because this deployment's first token was late (/metrics)."""

    provider: str
    deployment: str
    outcome: Literal["won", "lost", "failed"]  # the hedge's first token came first; the slow one's; none


class WorkerTimings(_Model):
    """Where a job's time went in the worker, so the API can tell its own overhead from upstream time."""

    # From the first upstream call to the first token (streams) or the whole answer; includes
    # failed attempts and their backoff, i.e. all time spent waiting on providers.
    upstream_ms: float


class DoneEvent(_Model):
    route: RouteInfo
    usage: dict[str, Any] | None = None
    # Whole chat.completion for non-streaming requests (the embeddings list for an embeddings
    # job); None for streams.
    completion: dict[str, Any] | None = None
    # Optional, for /metrics (an older worker sends neither).
    failures: list[AttemptFailure] = Field(default_factory=list)
    timings: WorkerTimings | None = None
    hedges: list[HedgeRecord] = Field(default_factory=list)


class ErrorBody(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEvent(_Model):
    status: int
    error: ErrorBody
    retry_after_s: float | None = None
    attempts: int = 0
    failures: list[AttemptFailure] = Field(default_factory=list)  # optional, for /metrics
    hedges: list[HedgeRecord] = Field(default_factory=list)


def encode_event(job_id: str, event_type: EventType, payload: bytes) -> bytes:
    """Frame one reply message."""
    return b"%s %s %s" % (job_id.encode(), event_type.encode(), payload)


def split_event(message: bytes) -> tuple[str, str, bytes]:
    """Inverse of encode_event: (job_id, event_type, payload). Raises ValueError if malformed."""
    job_id, event_type, payload = message.split(b" ", 2)
    decoded_type = event_type.decode()
    if decoded_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {decoded_type!r}")
    return job_id.decode(), decoded_type, payload


def cancel_message(job_id: str) -> bytes:
    """Control message asking a worker to stop a job (client went away)."""
    return b"cancel " + job_id.encode()


# --- Batches (docs/batches.md). The API writes files and batch records and loads a validated
# batch's lines; workers run the lines and finalize. Everything lives under the batch id so a
# batch survives any API or worker restart.
BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]
BATCH_TERMINAL: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
# Set of batch ids that are not terminal yet: every worker's batch runner scans it.
BATCH_ACTIVE_KEY = "ff:batches:active"


def file_meta_key(file_id: str) -> str:
    """FileRecord JSON of one uploaded or generated file."""
    return f"ff:file:{file_id}"


def file_content_key(file_id: str) -> str:
    """The file's bytes (a plain string value: Redis allows up to 512 MB)."""
    return f"ff:file:{file_id}:content"


def owner_files_key(owner: str) -> str:
    """Sorted set file id → created_at of one key's files, for listing."""
    return f"ff:files:{owner}"


def owner_file_bytes_key(owner: str) -> str:
    """Bytes of all files one key holds (uploads and batch results), for its storage quota."""
    return f"ff:files:{owner}:bytes"


def batch_key(batch_id: str) -> str:
    """Hash: `spec` (BatchSpec JSON) plus mutable fields (status, timestamps, counts, …)."""
    return f"ff:batch:{batch_id}"


def owner_batches_key(owner: str) -> str:
    """Sorted set batch id → created_at of one key's batches."""
    return f"ff:batches:{owner}"


def batch_part_key(batch_id: str, part: Literal["lines", "pending", "leases", "results", "attempts"]) -> str:
    """lines: idx → BatchLine JSON · pending: list of idx · leases: idx → worker id ·
    results: custom_id → "<idx> <o|e> <output line JSON>" · attempts: idx → tries so far."""
    return f"ff:batch:{batch_id}:{part}"


class FileRecord(_Model):
    id: str
    owner: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    # Unix seconds after which the file is gone (FILES_EXPIRING_KEY); None: kept until deleted.
    expires_at: int | None = None


class BatchSpec(_Model):
    """The immutable part of a batch record."""

    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    # How long the output and error files live after they are written (`output_expires_after`).
    output_expires_after_s: int | None = None


class BatchLine(_Model):
    """One validated input line: the chat job to run (job/request ids and deadline set per run)."""

    custom_id: str
    job: ChatJob
    # A /v1/responses line: the `response` object its answer fills in (fill_response), echoing
    # its request. Left out of other lines' JSON, which a worker of an earlier release reads.
    response_echo: dict[str, Any] | None = Field(default=None, exclude_if=lambda value: value is None)


def owner_queued_lines_key(owner: str) -> str:
    """Lines of one key's unfinished batches not yet finished (its cap: settings *_batch_queued_lines)."""
    return f"ff:batches:{owner}:queued"


def batch_pause_key(owner: str) -> str:
    """Set (with a TTL) while a key's limits refuse its batch lines: its batches wait that long."""
    return f"ff:batches:{owner}:paused"


# Hash '<provider>|<outcome>' → upstream attempts of batch lines, the whole pool's (/metrics).
BATCH_UPSTREAM_ATTEMPTS_KEY = "ff:batches:upstream-attempts"
# Sorted set file id → expires_at (unix s): the workers delete files once they are due.
FILES_EXPIRING_KEY = "ff:files:expiring"

# Delete a file and give its bytes back to its owner's quota, once even if deletes race (an
# owner's DELETE and the workers' expiry sweep). KEYS: the owner's file index (owner_files_key),
# file_meta_key, file_content_key, owner_file_bytes_key, FILES_EXPIRING_KEY. ARGV: id, bytes.
DELETE_FILE_LUA = """
redis.call('ZREM', KEYS[5], ARGV[1])
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('DECRBY', KEYS[4], ARGV[2])
return 1
"""


# --- Per-key limits and usage. The API's admission charges live requests and the workers' batch
# runner charges batch lines, to the same counters by the same rules (docs/keys-and-limits.md).
LIMIT_REQUESTS = "requests"  # per minute (settings.rate_window_s)
LIMIT_TOKENS = "tokens"  # per minute
LIMIT_REQUESTS_DAY = "requests-day"
DAY_S = 86_400
# A request's tokens are estimated at admission from its size, then corrected by the real usage.
BYTES_PER_TOKEN = 4
# A counter outlives its window by this much, so a correction that lands just after the
# window ended still finds its key (and never creates one without a TTL).
_TTL_MARGIN_MS = 1000

# A Lua function for every script that charges counters, so the all-or-nothing rule exists once.
# It charges KEYS[first .. first+#limits-1]: limits[i] units, ttls_ms[i] until that window ends,
# costs[i] units now. Returns {allowed 1|0, 1-based index of the first refusing limit or 0,
# remaining per limit...}.
CHARGE_LUA = """
local function charge(first, limits, ttls_ms, costs)
  local n = #limits
  local counts = {}
  local blocking = 0
  for i = 1, n do
    counts[i] = tonumber(redis.call('GET', KEYS[first + i - 1]) or '0')
    if blocking == 0 and counts[i] + costs[i] > limits[i] then blocking = i end
  end
  local out = {blocking == 0 and 1 or 0, blocking}
  for i = 1, n do
    local value = counts[i]
    if blocking == 0 then
      local key = KEYS[first + i - 1]
      value = redis.call('INCRBY', key, costs[i])
      if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ttls_ms[i]) end
    end
    out[#out + 1] = limits[i] - value
  end
  return out
end
"""

# The limits a decoded key record gets: {rpm, tpm, rpd}, its own overrides, else its tier's
# defaults from `defaults_json` ({"free": [rpm, tpm, rpd], "pro": [...]}).
KEY_LIMITS_LUA = """
local function key_limits(record, defaults_json)
  local defaults = cjson.decode(defaults_json)[record.tier]
  local own = record.limits
  if type(own) ~= 'table' then own = {} end
  local limits = {}
  for i, name in ipairs({'rpm', 'tpm', 'rpd'}) do
    local value = own[name]
    if type(value) ~= 'number' then value = defaults[i] end
    limits[i] = value
  end
  return limits
end
"""


def window_reset_s(window_s: int, now_s: float) -> float:
    """Seconds until the fixed window containing now_s ends."""
    return (int(now_s // window_s) + 1) * window_s - now_s


def counter_ttl_ms(window_s: int, now_s: float) -> int:
    """TTL for a counter created at now_s: until its window ends, plus a margin."""
    return math.ceil(window_reset_s(window_s, now_s) * 1000) + _TTL_MARGIN_MS


def counter_key(subject: str, name: str, window_s: int, now_s: float) -> str:
    """The Redis counter of `name` for `subject` in the window containing now_s."""
    return rate_limit_key(subject, name, window_s, int(now_s // window_s))


def tokens_counter_to_correct(charged_key: str, current_key: str, delta: int) -> str | None:
    """Which tokens-per-minute counter takes the correction from estimate to real usage.

    The window the estimate went into, while it lasts; once it has ended, only extra tokens move
    on to the current window (a refund to a past window would help nobody).
    """
    if not delta:
        return None
    if charged_key == current_key:
        return charged_key
    return current_key if delta > 0 else None


# What a usage hash counts per model (usage_field).
USAGE_METRICS = ("requests", "prompt_tokens", "completion_tokens", "failures")


def utc_day(now_s: float) -> str:
    """YYYY-MM-DD of a unix time, in UTC (the day the daily limits reset on, and usage is kept by)."""
    return time.strftime("%Y-%m-%d", time.gmtime(now_s))


def usage_field(model: str, metric: str) -> str:
    """The field of a usage hash (usage_key, usage_batch_key) that counts `metric` for `model`."""
    return f"{model}|{metric}"


def usage_batch_key(key_id: str, day: str) -> str:
    """Like usage_key, for the batch lines the key ran that day (shown apart from live usage)."""
    return f"ff:usage-batch:{key_id}:{day}"
