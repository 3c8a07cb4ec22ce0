import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The address `freeference serve` gives its embedded server when FREEFERENCE_REDIS_URL is unset,
# so every other command (keys, api, worker) finds it without configuration.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6399/0"
DEMO_CATALOG = Path(__file__).with_name("demo_catalog.yaml")
DEFAULT_CATALOG = Path(__file__).with_name("default_catalog.yaml")
# OpenAI's default for files of purpose `batch`, and the longest `expires_after` it accepts.
FILE_EXPIRY_MAX_S = 30 * 86_400
FILE_EXPIRY_MIN_S = 3_600


def default_data_dir() -> Path:
    """Where `freeference serve` keeps its embedded store and demo key: $XDG_DATA_HOME/freeference."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "freeference"


class Settings(BaseSettings):
    """Everything a process needs to know; one instance per process via get_settings()."""

    model_config = SettingsConfigDict(env_prefix="FREEFERENCE_", env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = "development"
    # None means "nothing configured": `serve` then starts an embedded server, `api`/`worker`
    # fall back to the conventional local Redis.
    redis_url: str | None = None
    catalog: Path = DEFAULT_CATALOG
    master_key: SecretStr | None = None
    # `freeference serve`: the embedded store's files and the demo key (None: default_data_dir()).
    data_dir: Path | None = None
    log_level: str = "INFO"
    # json: one object per line with the request id (cli/logging_setup.py); text for a terminal.
    log_format: Literal["json", "text"] = "json"

    # HTTP edge
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # How long the API keeps an idle client connection open. Longer than clients keep theirs
    # (httpx and the openai SDK: 5 s) and than a load balancer's idle timeout (60 s is common),
    # so the client side always closes first: a server that closes at the moment a client
    # reuses the connection makes that request fail with a read error before it reaches us.
    http_keepalive_s: int = Field(default=75, gt=0)
    # Connections waiting to be accepted. uvicorn's default (2,048) is below a burst of a few
    # thousand clients: the kernel drops the SYNs past it and each client resends its SYN only a
    # second later (then three), so refusals that take microseconds arrived seconds late. The
    # kernel caps it at net.core.somaxconn (4,096 on Linux 5.4+).
    http_backlog: int = Field(default=8192, ge=64)
    # Hostile-input bounds (docs/security.md). A request head (request line and headers) larger
    # than this, or with more header lines, is answered 431 and the connection closed.
    http_max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    http_max_headers: int = Field(default=100, ge=8)
    # A request head must be complete this long after its first byte (a fresh connection that
    # sends nothing is closed after it too): slowloris connections are dropped.
    http_header_timeout_s: float = Field(default=15.0, gt=0)
    # A body must arrive within this, plus one second per http_body_min_bytes_per_s it carries,
    # so a large upload at a fair rate finishes while a trickle is answered 408.
    http_body_timeout_s: float = Field(default=30.0, gt=0)
    http_body_min_bytes_per_s: int = Field(default=256 * 1024, gt=0)
    # Bodies one key may have arriving at once in one API process (429 past it). A body that
    # comes with its headers is whole at once; only slow uploads count against this.
    http_max_open_bodies_per_key: int = Field(default=32, ge=1)
    # Deepest nesting of objects and arrays accepted in any JSON a caller sends (bodies, batch
    # lines): far above what real tool schemas use, far below where serializers give up (~254).
    max_json_depth: int = Field(default=64, ge=8, le=200)
    max_messages: int = Field(default=2048, gt=0)
    # Inputs per /v1/embeddings request: OpenAI's own limit ("any array must be 2048 dimensions
    # or less", https://platform.openai.com/docs/api-reference/embeddings/create).
    max_embedding_inputs: int = Field(default=2048, gt=0)
    # Browser origins allowed to call the API (CORS), comma-separated; empty: CORS off (no
    # middleware at all). "*" allows any origin.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Protective limits (api/backpressure.py); 0 disables one. Past the first, a process answers
    # 503 + Retry-After at once instead of queueing without bound; past the second, 429. The
    # first is a safety ceiling far above normal: what refuses work under load is the worker
    # pool's measured capacity (docs/scaling.md), not this count.
    max_inflight_requests: int = Field(default=10_000, ge=0)  # chat requests in flight per API process
    max_streams_per_key: int = Field(default=128, ge=0)  # open streams per key, across all replicas
    default_capability: str = "text-basic"
    # Route model-less requests by the prompt's intent; off → always default_capability.
    classify_intent: bool = True

    # Queue and deadlines
    queue_name: str = "ff:queue"
    pickup_timeout_s: float = Field(default=5.0, gt=0)
    request_timeout_s: float = Field(default=300.0, gt=0)
    # How long the API waits in silence before it checks that the worker holding the job
    # is still alive (its heartbeat key), so a killed worker never leaves a caller hanging.
    worker_liveness_check_s: float = Field(default=1.0, gt=0)

    # Per-key limits: the tier defaults (a key's own rpm/tpm/rpd override them).
    free_rpm: int = Field(default=60, gt=0)
    free_tpm: int = Field(default=200_000, gt=0)
    free_rpd: int = Field(default=2_000, gt=0)
    pro_rpm: int = Field(default=600, gt=0)
    pro_tpm: int = Field(default=2_000_000, gt=0)
    pro_rpd: int = Field(default=50_000, gt=0)
    # The "minute" of rpm/tpm. Only tests shorten it, to see a window reset without waiting.
    rate_window_s: int = Field(default=60, gt=0)
    usage_retention_days: int = Field(default=90, gt=0)

    # Worker
    # A safety ceiling on jobs one worker runs at once, far above what it takes normally: a worker
    # takes new jobs while its measured capacity (event-loop lag, CPU, memory per open stream)
    # allows (workers/capacity.py), and jobs wait on the queue meanwhile.
    worker_max_jobs: int = Field(default=10_000, gt=0)
    # Jobs a worker may run before it has carried any load on time: a burst on a fresh worker
    # came before any measurement, and its room was then the safety ceiling, so the API admitted
    # thousands that the worker, once it measured them, could not start. Until its CPU per job is
    # measured it may run twice the most jobs it has run with its loop on time (doubling each
    # quarter second while on time); its measured CPU and memory per job bound it from then on.
    worker_start_capacity: int = Field(default=256, gt=0)
    # A worker takes no new job while its event loop lags more than this (the median over the
    # last 150 ms): every stream it already runs would get its chunks later. Four times it
    # makes a timeout this worker's fault, not the provider's (workers/capacity.py).
    worker_loop_lag_max_ms: float = Field(default=100.0, gt=0)
    # Share of one core a worker may use before it counts itself full (a Python process runs on one).
    worker_cpu_max: float = Field(default=0.85, gt=0, le=1)
    # Resident memory a worker may grow to before it takes no new job (0: no memory bound).
    worker_memory_max_mb: int = Field(default=0, ge=0)
    # How often a worker publishes its load record (what the API reads to refuse at once when no
    # worker can take a job soon); records older than 3 of these are ignored.
    worker_load_publish_s: float = Field(default=0.25, gt=0)
    # Workers are handed new jobs by a blocking pop of the ready list; this slow scan of arq's
    # queue only catches jobs whose pop was lost (docs/architecture.md, "Pickup").
    worker_fallback_poll_s: float = Field(default=0.5, gt=0)
    worker_heartbeat_s: float = Field(default=1.0, gt=0)
    worker_heartbeat_ttl_s: float = Field(default=3.0, gt=0)
    # How often a worker checks that the API processes of its running jobs are still there.
    worker_caller_check_s: float = Field(default=2.0, gt=0)
    # SIGTERM lets in-flight streams finish for this long before the worker exits.
    worker_drain_s: float = Field(default=30.0, ge=0)

    # Failover and shared health (DESIGN.md §5, docs/failover.md)
    breaker_failure_threshold: int = Field(default=3, ge=1)  # consecutive failures that open it
    breaker_cooldown_s: float = Field(default=5.0, gt=0)  # first open period; doubles per failed probe
    # The cooldown's cap, which is also the longest a recovered deployment waits for its next probe
    # under steady traffic (the open period is jittered down by up to a fifth, never up).
    breaker_max_cooldown_s: float = Field(default=8.0, gt=0, le=30)
    breaker_probe_ttl_s: float = Field(default=30.0, gt=0)  # a probe claim lapses if its worker died
    # A 429 whose Retry-After is at most this is waited out and retried once; longer → fail over.
    short_retry_after_max_s: float = Field(default=5.0, ge=0)
    # A request whose candidates are all cooling, open or being probed waits up to this long in
    # total for the soonest to come back before it is answered 503 no_models_available.
    availability_wait_max_s: float = Field(default=5.0, ge=0)
    rate_limit_cooldown_s: float = Field(default=10.0, gt=0)  # cooling after a 429 without Retry-After
    retry_backoff_s: float = Field(default=0.2, gt=0)  # base of the jittered 5xx / reset retry wait
    rate_limit_backoff_s: float = Field(default=0.5, gt=0)  # base of the jittered 429 backoff
    upstream_key_ban_s: float = Field(default=3600.0, gt=0)  # a key that got 401/403 sits out this long
    # A quota signal that names no reset (402 out of credits, a day cap without a time) parks
    # the key (or key and model) this long.
    quota_park_default_s: float = Field(default=3600.0, gt=0)
    # Upstream bodies are read up to these caps, so a provider answering with hundreds of MB
    # cannot grow a worker: an error body (a JSON error is a few KB; Gemini's with details
    # under 4 KB) past its cap is a provider error that fails over; a whole JSON answer or one
    # SSE line past the second, or a stream past the third, is a broken stream.
    upstream_error_body_max_bytes: int = Field(default=64 * 1024, gt=0)
    upstream_body_max_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    upstream_stream_max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    latency_ewma_alpha: float = Field(default=0.3, gt=0, le=1)
    # Workers re-publish their routable deployments this often; the API trusts entries 3x as old.
    live_deployments_publish_s: float = Field(default=5.0, gt=0)
    models_random_per_hour: int = Field(default=10, ge=1)
    # Responses API answers are kept this long for previous_response_id and GET (OpenAI keeps 30 days).
    responses_ttl_s: float = Field(default=30 * 86_400.0, gt=0)

    # Lines a key may have queued in unfinished batches (a per-key override wins). The free
    # default is its daily request limit: a larger batch could not finish in its 24 h window.
    free_batch_queued_lines: int = Field(default=2_000, gt=0)
    pro_batch_queued_lines: int = Field(default=50_000, gt=0)
    # Share of a key's per-minute limits its batch lines may use, so live requests by the same
    # key keep the rest while a batch runs. The daily limit is shared in full.
    batch_rate_share: float = Field(default=0.8, gt=0, le=1)

    # Routing that fits the request and heals itself (docs/failover.md, "Which model answers").
    # Candidates scoring within this of the best share the traffic by quota headroom and latency
    # (0: always the best-ranked one).
    spread_score_band: float = Field(default=0.05, ge=0, le=1)
    # A deployment that said it does not take a feature (tools, images, JSON, a field) is kept from
    # requests that need it this long, by every worker.
    feature_mark_s: float = Field(default=3600.0, gt=0)
    # A context window a provider stated in an error is routed by this long before it is trusted
    # to have grown again.
    learned_window_s: float = Field(default=86_400.0, gt=0)
    # Hedged first token: when a deployment's first token is later than its recent p95 times the
    # multiplier (between the floor and the cap), the next candidate starts too; the first token wins.
    hedge_enabled: bool = True
    hedge_ttft_multiplier: float = Field(default=2.0, ge=1)
    hedge_min_s: float = Field(default=1.0, gt=0)
    hedge_max_s: float = Field(default=8.0, gt=0)
    # At most this share of a deployment's requests in a minute (per worker, at least one) is hedged.
    hedge_max_share: float = Field(default=0.05, ge=0, le=1)

    # Batches (docs/batches.md). Files live in Redis: the upload limit is also a memory budget.
    batch_upload_max_bytes: int = Field(default=200 * 1024 * 1024, gt=0)  # OpenAI's limit
    batch_max_lines: int = Field(default=50_000, gt=0)  # OpenAI's limit
    # Bytes of files one key may hold (uploads + batch results); uploads past it are refused.
    batch_storage_max_bytes_per_key: int = Field(default=1024**3, gt=0)
    batch_window_s: float = Field(default=86_400.0, gt=0)  # what completion_window "24h" means
    # Lines in flight per worker process; each live request the worker runs takes one of these slots.
    batch_worker_concurrency: int = Field(default=32, ge=1)
    batch_max_concurrency: int = Field(default=64, ge=1)  # lines in flight per batch, whole pool
    # Batch concurrency backs off while a worker's event loop lags more than this (0: never).
    batch_loop_lag_target_ms: float = Field(default=20.0, ge=0)
    batch_line_max_attempts: int = Field(default=3, ge=1)  # a line failing with 5xx is re-queued
    batch_poll_s: float = Field(default=0.25, gt=0)  # how often an idle runner looks for work
    # Files (uploads and batch results) expire this long after creation unless the upload's or
    # the batch's `expires_after` says otherwise (OpenAI's default for batch files: 30 days).
    file_expiry_s: int = Field(default=FILE_EXPIRY_MAX_S, gt=0)

    @field_validator("redis_url", "data_dir", "master_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `FREEFERENCE_REDIS_URL=` (as compose files write `${VAR:-}`) means "not configured".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> "Settings":
        if self.environment == "production":
            key = self.master_key.get_secret_value() if self.master_key else ""
            if len(key) < 16:
                raise ValueError("FREEFERENCE_MASTER_KEY must be set (16+ characters) when "
                                 "FREEFERENCE_ENVIRONMENT=production; generate one with `openssl rand -hex 24`")
        if self.hedge_min_s > self.hedge_max_s:
            raise ValueError("hedge_min_s must not be larger than hedge_max_s")
        if self.worker_heartbeat_ttl_s <= self.worker_heartbeat_s:
            raise ValueError("worker_heartbeat_ttl_s must be longer than worker_heartbeat_s")
        return self

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def effective_data_dir(self) -> Path:
        return self.data_dir or default_data_dir()

    def tier_limits(self, tier: Literal["free", "pro"]) -> tuple[int, int, int]:
        """The tier's default (requests/minute, tokens/minute, requests/day)."""
        if tier == "pro":
            return self.pro_rpm, self.pro_tpm, self.pro_rpd
        return self.free_rpm, self.free_tpm, self.free_rpd

    def tier_batch_queued_lines(self, tier: Literal["free", "pro"]) -> int:
        """The tier's default cap on lines queued in unfinished batches."""
        return self.pro_batch_queued_lines if tier == "pro" else self.free_batch_queued_lines


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
