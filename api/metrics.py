"""Prometheus metrics of one API process, collected from what the API already sees.

Every request passes MetricsMiddleware (status, route, served model, durations); the reply
events of chat jobs add queue wait, upstream attempts and worker timings (`note_*` below,
called by the dispatcher). Because the worker reports its attempts and timings in its done /
error events, one scrape per API replica sees everything about the requests it served.
Cluster state (queue depth, live workers, circuit breakers) is read from Redis at scrape time.
Each app owns its registry: no process-global metric state, and tests may build many apps.
"""

import logging
import time
from collections import Counter as Tally
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from settings.logfields import STORE_DOWN
from workers.protocol import (
    BATCH_UPSTREAM_ATTEMPTS_KEY,
    LIVE_DEPLOYMENTS_KEY,
    WORKER_HEARTBEAT_PREFIX,
    WORKERS_KEY,
    DeploymentHealth,
    deployment_health_key,
    worker_heartbeat_key,
)

log = logging.getLogger("freeference.metrics")

# Latency buckets from 1 ms (gateway overhead) to 2 min (long streams).
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
BREAKER_STATES = ("closed", "half_open", "open", "cooling", "gone")
# Set in a request's state by the edge when the caller left before its body was complete
# (api/middleware.py): counted as status 499, the caller's doing, not the gateway's.
CLIENT_LEFT_STATE = "ff_client_left"
CLIENT_LEFT_STATUS = 499
# Where a streamed response may send its body messages after the first (api/event_stream.py): the
# send MetricsMiddleware was given. The middlewares inside it (metrics, the edge's request id and
# bounded body) watch only a response's start and first body, so every later write of a long
# stream skips their wrappers. A middleware added inside them that must see every body message
# has to put its own send here.
DIRECT_BODY_SEND = "ff.direct_body_send"
# Request heads refused by the HTTP protocol (api/http_protocol.py), by reason. Process-wide, unlike
# the rest: the protocol serves connections before and outside any app.
HEAD_REFUSALS: Tally[str] = Tally()
# Set by a route or middleware on a refusal it makes itself, so the limit is named in metrics.
LIMIT_HEADER = "x-freeference-limit"


class Metrics:
    """The metric families of one API app, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("freeference_requests", "HTTP requests answered, by route and outcome.",
                                ["route", "method", "status", "intent", "model", "provider"], registry=r)
        self.duration = Histogram("freeference_request_duration_seconds",
                                  "Arrival to last byte (whole stream for SSE).", ["route", "stream"],
                                  buckets=_LATENCY_BUCKETS_S, registry=r)
        self.first_token = Histogram("freeference_time_to_first_token_seconds",
                                     "Arrival to the first SSE byte of a streamed completion.",
                                     buckets=_LATENCY_BUCKETS_S, registry=r)
        self.queue_wait = Histogram("freeference_queue_wait_seconds",
                                    "Enqueue to a worker's accepted event.", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.overhead = Histogram("freeference_gateway_overhead_seconds",
                                  "Time the gateway added (API, queue, reply path): caller-observed first token "
                                  "(streams) or answer, minus the worker's routing + upstream time.", ["kind"],
                                  buckets=_OVERHEAD_BUCKETS_S, registry=r)
        self.upstream_attempts = Counter("freeference_upstream_attempts",
                                         "Upstream attempts by provider and outcome (ok or the failure reason).",
                                         ["provider", "outcome"], registry=r)
        self.job_errors = Counter("freeference_job_errors",
                                  "Jobs that ended in an error event (streams: in-band), by status and code.",
                                  ["status", "code"], registry=r)
        self.hedges = Counter("freeference_hedges",
                              "Hedged first tokens, by the slow deployment's provider and outcome (won: the hedge's "
                              "token came first; lost: the slow one's; failed: the hedge failed).",
                              ["provider", "outcome"], registry=r)
        self.usage_estimated = Counter("freeference_usage_estimated",
                                       "Answers whose provider sent no usage: the gateway estimated the tokens.",
                                       ["provider"], registry=r)
        self.rejections = Counter("freeference_rate_limit_rejections",
                                  "Requests refused by a protective limit (429 / 503).", ["limit"], registry=r)
        self.inflight_requests = Gauge("freeference_inflight_requests", "Requests being served by this process.",
                                       registry=r)
        self.inflight_streams = Gauge("freeference_inflight_streams", "SSE streams open in this process.",
                                      registry=r)
        self.cluster = ClusterCollector()
        r.register(self.cluster)
        r.register(_HeadRefusals())
        # labels() costs microseconds per call; the label sets are few (routes, models, providers).
        self._children: dict[tuple[str, ...], Any] = {}

    def child(self, family: Any, *labels: str) -> Any:
        """family.labels(*labels), cached."""
        key = (family._name, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*labels)
        return found

    def attempt(self, provider: str, outcome: str) -> Any:
        """The upstream-attempts counter of one provider and outcome."""
        return self.child(self.upstream_attempts, provider, outcome)


@dataclass(slots=True)
class RequestObservation:
    """What one request's metrics need, filled in as the request goes (in a contextvar)."""

    metrics: Metrics
    started_s: float
    submitted_s: float | None = None
    upstream_s: float | None = None  # the worker's routing + upstream time of the served job


_CURRENT: ContextVar[RequestObservation | None] = ContextVar("freeference_metrics_request", default=None)


def note_submitted() -> None:
    """A job of the current request was enqueued (again, after a lost worker)."""
    obs = _CURRENT.get()
    if obs is not None:
        obs.submitted_s = time.perf_counter()


def note_event(event_type: str, payload: bytes) -> None:
    """Account one reply event of the current request's job."""
    obs = _CURRENT.get()
    if obs is None:
        return
    if event_type == "accepted":
        if obs.submitted_s is not None:
            obs.metrics.queue_wait.observe(time.perf_counter() - obs.submitted_s)
        return
    if event_type not in ("done", "error"):
        return
    # orjson and plain lookups, not a pydantic model: a non-streaming done event carries the
    # whole completion, and validating it again here would cost more than all other metrics.
    try:
        event = orjson.loads(payload)
        _account(obs.metrics, event_type, event)
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        log.warning("metrics: unreadable %s event", event_type)


def _account(m: "Metrics", event_type: str, event: dict[str, Any]) -> None:
    for failure in event.get("failures") or ():
        m.attempt(failure["provider"], failure["reason"]).inc()
    for hedge in event.get("hedges") or ():
        m.child(m.hedges, hedge["provider"], hedge["outcome"]).inc()
    if event_type == "error":
        m.job_errors.labels(str(event.get("status")), (event.get("error") or {}).get("code") or "").inc()
        return
    route = event.get("route")
    if route:
        m.attempt(route["provider"], "ok").inc()
        if (event.get("usage") or {}).get("estimated"):
            m.child(m.usage_estimated, route["provider"]).inc()
    timings = event.get("timings")
    obs = _CURRENT.get()
    if timings and obs is not None:
        obs.upstream_s = float(timings["upstream_ms"]) / 1000


class MetricsMiddleware:
    """Pure ASGI: times every request and counts it with the route metadata the response carries."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        scope[DIRECT_BODY_SEND] = send
        obs = RequestObservation(metrics=m, started_s=time.perf_counter())
        token = _CURRENT.set(obs)
        status = 500  # what the caller gets if the app raises before answering
        labels: dict[bytes, bytes] = {}
        stream = False
        first_body_s: float | None = None

        async def observe_send(message: Message) -> None:
            nonlocal status, stream, first_body_s
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    name = name.lower()
                    if name.startswith((b"x-freeference-", b"x-ratelimit-remaining-")) or name == b"content-type":
                        labels[name] = value
                stream = labels.get(b"content-type", b"").startswith(b"text/event-stream")
                if stream:
                    m.inflight_streams.inc()
            elif stream and first_body_s is None and message.get("body"):
                first_body_s = time.perf_counter()
            await send(message)

        m.inflight_requests.inc()
        try:
            await self.app(scope, receive, observe_send)
        finally:
            m.inflight_requests.dec()
            if stream:
                m.inflight_streams.dec()
            _CURRENT.reset(token)
            if scope.get("state", {}).get(CLIENT_LEFT_STATE):
                status = CLIENT_LEFT_STATUS
            self._record(scope, obs, status, labels, stream, first_body_s)

    def _record(self, scope: Scope, obs: RequestObservation, status: int, labels: dict[bytes, bytes],
                stream: bool, first_body_s: float | None) -> None:
        m = self.metrics
        now = time.perf_counter()
        route = getattr(scope.get("route"), "path", None) or "unmatched"  # a template: bounded cardinality

        def header(name: bytes) -> str:
            return labels.get(name, b"").decode("latin-1")

        m.child(m.requests, route, scope.get("method", ""), str(status), header(b"x-freeference-intent"),
                header(b"x-freeference-model"), header(b"x-freeference-provider")).inc()
        m.child(m.duration, route, "true" if stream else "false").observe(now - obs.started_s)
        if first_body_s is not None:
            m.first_token.observe(first_body_s - obs.started_s)
        if obs.upstream_s is not None and status == 200:
            seen_s = (first_body_s if stream and first_body_s is not None else now) - obs.started_s
            m.child(m.overhead, "first_token" if stream else "complete").observe(max(seen_s - obs.upstream_s, 0.0))
        if status in (429, 503):
            limit = header(LIMIT_HEADER.encode())
            if not limit and status == 429:
                limit = "tokens" if header(b"x-ratelimit-remaining-tokens") == "0" else "requests"
            if limit:
                m.rejections.labels(limit).inc()


@dataclass
class ClusterSnapshot:
    """Cluster state read from Redis at scrape time."""

    redis_up: bool = False
    queue_depth: int = 0
    workers: int = 0
    worker_jobs: int = 0
    breakers: dict[str, str] = field(default_factory=dict)  # deployment → state
    inflight_jobs: int = 0  # this process's jobs awaiting events (from the reply hub)
    # (provider, outcome) → upstream attempts of batch lines, the whole pool's (the workers count them).
    batch_attempts: dict[tuple[str, str], int] = field(default_factory=dict)


class ClusterCollector(Collector):
    """Yields the last snapshot; refresh() reads a new one before each scrape."""

    def __init__(self) -> None:
        self.snapshot = ClusterSnapshot()

    async def refresh(self, redis: Redis, queue_name: str, inflight_jobs: int) -> None:
        """Read queue depth, worker heartbeats and breaker states (a few pipelined commands)."""
        snap = ClusterSnapshot(inflight_jobs=inflight_jobs)
        try:
            snap.queue_depth = int(await redis.zcard(queue_name))
            infos = await live_worker_infos(redis)
            deployments = sorted(d.decode() for d in await redis.hkeys(LIVE_DEPLOYMENTS_KEY))  # type: ignore[misc]
            async with redis.pipeline(transaction=False) as pipe:
                for deployment in deployments:
                    pipe.hgetall(deployment_health_key(deployment))
                pipe.hgetall(BATCH_UPSTREAM_ATTEMPTS_KEY)
                *healths, batch_attempts = await pipe.execute()
            snap.redis_up = True
        except (RedisError, OSError) as exc:
            log.warning("metrics: redis unavailable at scrape (%s)", type(exc).__name__, extra=STORE_DOWN)
            self.snapshot = snap
            return
        snap.workers = len(infos)
        snap.worker_jobs = sum(_running(raw) for raw in infos)
        now_ms = int(time.time() * 1000)
        for deployment, raw in zip(deployments, healths, strict=True):
            snap.breakers[deployment] = DeploymentHealth.from_hash(raw).state(now_ms)
        for name, count in batch_attempts.items():
            provider, _, outcome = name.decode().rpartition("|")
            snap.batch_attempts[(provider, outcome)] = int(count)
        self.snapshot = snap

    def collect(self) -> Iterator[Metric]:
        """The snapshot as metric families."""
        snap = self.snapshot
        yield _gauge("freeference_redis_up", "1 when the last scrape could read Redis.", int(snap.redis_up))
        yield _gauge("freeference_queue_depth", "Jobs enqueued and not yet picked up by a worker.", snap.queue_depth)
        yield _gauge("freeference_workers_alive", "Workers with a live heartbeat.", snap.workers)
        yield _gauge("freeference_worker_jobs_running", "Jobs running on all workers (from heartbeats).",
                     snap.worker_jobs)
        yield _gauge("freeference_inflight_jobs", "Jobs of this API process awaiting their worker's events.",
                     snap.inflight_jobs)
        family = GaugeMetricFamily("freeference_breaker_state",
                                   "Circuit-breaker state per deployment (1 for its current state).",
                                   labels=["deployment", "state"])
        for deployment, state in snap.breakers.items():
            for candidate in BREAKER_STATES:
                family.add_metric([deployment, candidate], 1.0 if candidate == state else 0.0)
        yield family
        # Counted by the workers in Redis, so every replica reports the same cluster-wide value:
        # aggregate it with max(), not sum() (unlike freeference_upstream_attempts_total).
        batch = CounterMetricFamily("freeference_batch_upstream_attempts",
                                    "Upstream attempts of batch lines by provider and outcome, whole pool.",
                                    labels=["provider", "outcome"])
        for (provider, outcome), count in sorted(snap.batch_attempts.items()):
            batch.add_metric([provider, outcome], count)
        yield batch


class _HeadRefusals(Collector):
    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("freeference_request_heads_refused",
                                     "Requests refused before any app saw them: head too large, too many header "
                                     "lines, head too slow, or a connection idle from its start.", labels=["reason"])
        for reason, count in sorted(HEAD_REFUSALS.items()):
            family.add_metric([reason], count)
        yield family


async def live_worker_infos(redis: Redis) -> list[bytes]:
    """Heartbeat payloads of the live workers, from the workers' sorted set (no keyspace scan;
    SCAN only when the set is empty, for workers older than it)."""
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now_ms)
        pipe.zrangebyscore(WORKERS_KEY, now_ms, "+inf")
        _, ids = await pipe.execute()
    if ids:
        keys = [worker_heartbeat_key(worker.decode()) for worker in ids]
    else:
        keys = [k async for k in redis.scan_iter(match=WORKER_HEARTBEAT_PREFIX + "*", count=1000)]
    if not keys:
        return []
    return [info for info in await redis.mget(keys) if info]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _running(raw: bytes) -> int:
    try:
        value = orjson.loads(raw).get("running", 0)
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return value if isinstance(value, int) else 0
