"""The arq job for one chat completion: claim, classify, route, call upstream, publish events."""

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from router import capabilities, why
from router.catalog import Deployment, RuntimeCatalog
from router.embeddings import (
    embedding_groups,
    embedding_needs,
    encode_answer,
    estimated_prompt_tokens,
    input_count,
    longest_input_tokens,
    parse_answer,
)
from router.errors import ContentRejected, ContextTooLong, NotServable, RequestRejected, UpstreamError
from router.failover import AllFailed, FailoverExecutor, MidStreamFailure, RunState
from router.health import HealthSnapshot
from router.intent import classify_request
from router.select import (
    NoCandidates,
    NoneAvailable,
    NotCapable,
    NothingFits,
    Ranking,
    candidate_groups,
    estimate_tokens,
    rank,
)
from settings import Settings
from settings.catalog import Intent
from settings.logfields import STORE_DOWN
from workers.claim import JobClaim
from workers.coalesce import QueuedChunk
from workers.events import EventPublisher
from workers.protocol import (
    REQUEST_ID,
    AttemptFailure,
    ChatJob,
    DoneEvent,
    ErrorBody,
    ErrorEvent,
    EventType,
    HedgeRecord,
    RouteInfo,
    StartEvent,
    WorkerTimings,
    accepted_payload,
    encode_event,
    reply_channel_of,
)
from workers.usage_estimate import estimated_usage

log = logging.getLogger("freeference.worker")


@dataclass
class WorkerState:
    """Per-process objects, opened in on_startup and kept in arq's ctx."""

    worker_id: str
    settings: Settings
    catalog: RuntimeCatalog
    executor: FailoverExecutor
    events: EventPublisher
    running: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # job id → its reply channel, so the worker can stop jobs whose API process is gone.
    callers: dict[str, str] = field(default_factory=dict)


class CallerGone(Exception):
    """Nobody listens on the job's reply channel any more: its API process died."""


@dataclass
class JobCleanup:
    """Commands that end a job's life in Redis (its arq keys), sent with its last event."""

    commands: list[tuple[str, ...]]
    sent: bool = False


def _retrieve(future: "asyncio.Future[Any]") -> None:
    # Retrieved even if nobody looks (a cancelled job, a write nobody waits for): a failure is
    # the job's or the publisher's business, and no "exception never retrieved" warning is due.
    if not future.cancelled():
        future.exception()


class _Receipts:
    """The replies to one job's chunks, taken as they arrive (workers/events.py, submit_to).

    Each PUBLISH answers how many subscribers got it; zero means the API process that waits for
    this job is gone.
    """

    __slots__ = ("_room", "error", "gone", "unconfirmed")

    def __init__(self) -> None:
        self.unconfirmed = 0
        self.gone = False
        self.error: BaseException | None = None
        self._room: asyncio.Future[None] | None = None  # waited on while too many are unconfirmed

    def done(self) -> bool:
        return False  # takes every reply of its job's chunks, however many

    def set_result(self, receivers: int, /) -> None:
        self.unconfirmed -= 1
        self.gone = self.gone or receivers == 0
        self._wake()

    def set_exception(self, exception: BaseException, /) -> None:
        self.unconfirmed -= 1
        self.error = self.error or exception
        self._wake()

    async def room(self, unconfirmed: int) -> None:
        """Until no more than `unconfirmed` replies are outstanding."""
        while self.unconfirmed > unconfirmed:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    def _wake(self) -> None:
        if self._room is not None and not self._room.done():
            self._room.set_result(None)


class Publisher:
    """One job's events, on its API process's reply channel, through the worker's publisher.

    A stream's events are not waited for one by one: each chunk is queued and the next one is
    read from upstream while it travels, and the replies of earlier PUBLISHes are checked as
    they arrive (a failure, or no receiver at all, ends the job one chunk later). Waiting for
    every reply cost the job a sleep and a wake-up per chunk, about a fifth of a worker's CPU
    with 100 streams in flight. The last event (done or error) waits for everything before it.
    """

    # Replies this many events behind: wait for the oldest (a slow Redis must not let a fast
    # upstream pile up events in memory).
    MAX_UNCONFIRMED = 64

    def __init__(self, events: EventPublisher, job: ChatJob, cleanup: "JobCleanup | None" = None) -> None:
        self._events = events
        self._job = job
        self._cleanup = cleanup
        self._held: bytes | None = None
        self._unconfirmed: collections.deque[asyncio.Future[int]] = collections.deque()  # of events other than chunks
        self._chunks = _Receipts()
        self._waiting: QueuedChunk | None = None  # the last chunk queued, while later text may join it

    def hold(self, event_type: EventType, payload: bytes) -> None:
        """Queue an event to go out with the next one (the route goes with the first chunk)."""
        self._held = encode_event(self._job.job_id, event_type, payload)

    async def send_chunk(self, chunk: dict[str, Any]) -> None:
        """Queue a chunk; plain text joins the previous chunk instead while that one still waits
        for the publisher (workers/coalesce.py)."""
        if self._waiting is not None and self._waiting.join(chunk):
            return  # rides with a PUBLISH already queued: nothing more to send or wait for
        self._release_held()
        queued = QueuedChunk(self._job.reply_channel, self._job.job_id, chunk)
        self._waiting = queued
        self._chunks.unconfirmed += 1
        self._events.submit_to(queued.command, self._chunks)
        # No loop pass here: the job's next upstream read waits anyway unless data is already
        # buffered, and text parsed from a buffer joins this chunk while it waits. A pass per
        # chunk woke the job's whole await chain a second time for every chunk.
        await self._check_sent()

    async def _sent_one(self) -> None:
        # One loop pass, so the publisher writes this event now.
        await asyncio.sleep(0)
        await self._check_sent()

    async def _check_sent(self) -> None:
        while self._unconfirmed and (self._unconfirmed[0].done() or len(self._unconfirmed) > self.MAX_UNCONFIRMED):
            self._confirm(await self._unconfirmed.popleft())
        chunks = self._chunks
        if chunks.unconfirmed > self.MAX_UNCONFIRMED:
            await chunks.room(self.MAX_UNCONFIRMED)
        if chunks.error is not None:
            raise chunks.error
        if chunks.gone:
            raise CallerGone(self._job.reply_channel)

    def _release_held(self) -> None:
        if self._held is not None:
            self._queue(self._events.submit(self._job.reply_channel, self._held))  # in the same write, first
            self._held = None

    async def send(self, event_type: EventType, payload: bytes) -> None:
        self._waiting = None
        self._release_held()
        self._queue(self._events.submit(self._job.reply_channel, encode_event(self._job.job_id, event_type, payload)))
        if event_type in ("start", "chunk"):
            await self._sent_one()
            return
        if self._cleanup is not None and not self._cleanup.sent:
            # The job's own keys go in the same write as its last event, not a round trip later.
            self._cleanup.sent = True
            for command in self._cleanup.commands:
                self._events.submit_command(*command).add_done_callback(_retrieve)
        # Replies come in order, so once this last event's is in, every chunk's is too.
        pending, self._unconfirmed = list(self._unconfirmed), collections.deque()
        outcomes = await asyncio.gather(*pending, return_exceptions=True)  # every failure retrieved
        failure = self._chunks.error or next((n for n in outcomes if isinstance(n, BaseException)), None)
        if failure is not None:
            raise failure

    def _queue(self, sent: "asyncio.Future[int]") -> None:
        sent.add_done_callback(_retrieve)
        self._unconfirmed.append(sent)

    def _confirm(self, receivers: int) -> None:
        # PUBLISH answers how many subscribers got the message. Zero means the API process that
        # waits for this job is gone: stop, so no upstream call outlives its caller.
        if receivers == 0:
            raise CallerGone(self._job.reply_channel)


def _intent_for(job: ChatJob, catalog: RuntimeCatalog, settings: Settings) -> tuple[Intent, str]:
    """The intent to route by, and why."""
    if job.intent_hint is not None:
        return job.intent_hint, "route.intent hint in the request"
    if job.requested_model is not None:
        cap_intent = catalog.intent_of_capability(job.requested_model)
        if cap_intent is not None:
            return cap_intent, f"capability {job.requested_model}"
        return "general", "pinned model"
    if not settings.classify_intent:
        default_intent = catalog.intent_of_capability(settings.default_capability) or "general"
        return default_intent, f"default capability {settings.default_capability}"
    body = job.body
    result = classify_request(body.get("messages") or [], has_tools=bool(body.get("tools") or body.get("functions")),
                              response_format=body.get("response_format"))
    return result.intent, f"{result.reason} (confidence {result.confidence:.2f})"


class NotClaimed(Exception):
    """The job's claim did not make it this worker's: another one runs it, or its caller left."""


async def chat_completion(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    """arq entry point. Never raises: every outcome becomes a done or error event.

    `ctx["claim"]` settles the worker's claim on the job (workers/claim.py). A job popped off
    the ready list starts before it settles: the job is parsed and classified meanwhile, and
    it waits for the claim only before it ranks its candidates (the claim brings their health),
    so nothing reaches upstream or the caller unless this worker holds the job. The claim also
    announced the job to the waiting API process when the job id names that process.
    """
    state: WorkerState = ctx["state"]
    claim: asyncio.Future[JobClaim] = ctx["claim"]
    try:
        job = ChatJob.model_validate(payload)
    except ValidationError:
        log.error("job %s has an unreadable payload (an API of another version?)", ctx.get("job_id"))
        with contextlib.suppress(RedisError, OSError):
            if (await claim).announced:
                await report_unrunnable(state, str(ctx.get("job_id")))
        return
    REQUEST_ID.set(job.request_id)  # this job's task only: its log lines name the request
    confirmed = Confirmation(claim, state, job)
    inner = asyncio.create_task(_run(job, state, Publisher(state.events, job, ctx.get("cleanup")), confirmed))
    state.running[job.job_id] = inner
    state.callers[job.job_id] = job.reply_channel
    try:
        await inner
    except asyncio.CancelledError:
        if not inner.cancelled():
            raise  # the worker itself is shutting down
        log.info("job %s cancelled: the client went away", job.job_id)
    finally:
        state.running.pop(job.job_id, None)
        state.callers.pop(job.job_id, None)


class Confirmation:
    """A job's claim, confirmed once: the health read with it, or NotClaimed when it must not run here.

    Awaited in the job's own task (no task of its own: one wake-up fewer between the claim's
    reply and the upstream call), first before ranking, again if the job fails before that.
    """

    def __init__(self, claim: "asyncio.Future[JobClaim]", state: WorkerState, job: ChatJob) -> None:
        self._claim = claim
        self._state = state
        self._job = job
        self._outcome: HealthSnapshot | NotClaimed | None = None
        self._settled = False

    async def __call__(self) -> HealthSnapshot | None:
        if not self._settled:
            self._outcome = await self._settle()
            self._settled = True
        if isinstance(self._outcome, NotClaimed):
            raise self._outcome
        return self._outcome

    async def _settle(self) -> HealthSnapshot | NotClaimed | None:
        job = self._job
        try:
            won = await self._claim
        except (RedisError, OSError) as exc:  # whether this worker holds the job is unknown: it must not run
            log.warning("job %s not run: its claim failed (%s)", job.job_id, type(exc).__name__, extra=STORE_DOWN)
            return NotClaimed()
        if not won.runnable:
            return NotClaimed()
        if not won.announced:  # an id that names no API process: announce it here
            try:
                await self._state.events.publish(
                    job.reply_channel, encode_event(job.job_id, "accepted", accepted_payload(self._state.worker_id)))
            except (RedisError, OSError) as exc:
                log.warning("job %s: its pickup was not announced (%s)", job.job_id, type(exc).__name__,
                            extra=STORE_DOWN)
        return won.health


async def report_unrunnable(state: WorkerState, job_id: str) -> None:
    """Tell the caller of an announced job that it cannot run (instead of silence until its deadline)."""
    channel = reply_channel_of(job_id)
    if channel is None:
        return
    event = ErrorEvent(status=500, error=ErrorBody(message="The worker could not read this request's job.",
                                                   type="server_error", code="internal_error"))
    with contextlib.suppress(RedisError, OSError):
        await state.events.publish(channel, encode_event(job_id, "error", event.model_dump_json().encode()))




async def _run(job: ChatJob, state: WorkerState, out: Publisher, confirmed: Confirmation) -> None:
    run = RunState()
    started = time.monotonic()
    first_output_s: float | None = None

    async def on_start(route: RouteInfo) -> None:
        # The route is announced right before the first chunk, so both leave in one round trip.
        out.hold("start", StartEvent(route=route).model_dump_json().encode())

    async def on_chunk(chunk: dict[str, Any]) -> None:
        nonlocal first_output_s
        first_output_s = first_output_s or time.monotonic()
        await out.send_chunk(chunk)

    try:
        done = await execute(job, state, run, on_start, on_chunk, confirmed)
    except asyncio.CancelledError:
        raise
    except NotClaimed:
        return  # silently: the job is another worker's, or nobody waits for it
    except CallerGone:
        log.info("job %s stopped: its API process is gone", job.job_id)
        return
    except (RedisError, ConnectionError) as exc:
        # Redis went away mid-job: the API waiting for it lost its reply channel too and tells its caller.
        log.warning("job %s ended: redis unavailable (%s)", job.job_id, type(exc).__name__, extra=STORE_DOWN)
        return
    except Exception as exc:  # every failure kind is mapped; anything else is a bug, logged
        try:
            await confirmed()  # a job that failed before its claim settled answers only if it is ours
        except NotClaimed:
            return
        event = error_event(exc, run)
        event.failures = _failures(run)
        event.hedges = _hedges(run)
        with contextlib.suppress(RedisError, OSError):  # Redis is gone: nobody to tell
            await out.send("error", event.model_dump_json().encode())
        return
    done.failures = _failures(run)
    done.hedges = _hedges(run)
    done.timings = WorkerTimings(upstream_ms=((first_output_s or time.monotonic()) - started) * 1000)
    try:
        await out.send("done", done.model_dump_json().encode())
    except (RedisError, ConnectionError) as exc:
        log.warning("job %s: its result was not delivered, redis unavailable (%s)", job.job_id, type(exc).__name__,
                    extra=STORE_DOWN)


def _failures(run: RunState) -> list[AttemptFailure]:
    return [AttemptFailure(provider=a.provider, deployment=a.deployment, reason=a.reason) for a in run.attempts]


def _hedges(run: RunState) -> list[HedgeRecord]:
    return [HedgeRecord(deployment=d, provider=p, outcome=o) for d, p, o in run.hedges]  # type: ignore[arg-type]


OnRoute = Callable[[RouteInfo], Awaitable[None]]
OnChunk = Callable[[dict[str, Any]], Awaitable[None]]


async def execute(job: ChatJob, state: WorkerState, run: RunState, on_start: OnRoute, on_chunk: OnChunk,
                  claimed: Callable[[], Awaitable[HealthSnapshot | None]] | None = None) -> DoneEvent:
    """Route and run one chat job (live or batch line); raises the typed failure on error.

    `claimed` (live jobs: the job's Confirmation) is awaited once the request is
    classified, before anything is ranked or sent; it raises NotClaimed, or returns every
    deployment's health read with the claim (None for a catalog too large for that), which
    serves the first ranking; later ones read afresh.
    """
    deadline_s = job.deadline_unix_ms / 1000

    def budget_s() -> float:
        return max(deadline_s - time.time(), 0.001)

    if job.endpoint == "embeddings":
        async with asyncio.timeout(budget_s()):
            return await _embed(job, state, run, budget_s, claimed)
    intent, reason = _intent_for(job, state.catalog, state.settings)
    groups = candidate_groups(state.catalog, job.requested_model, intent, job.fallback_models)
    body = dict(job.body)
    needed_tokens = estimate_tokens(body)
    features = capabilities.required(body)
    wants_usage = _ask_for_usage(body, job.stream)

    async def attempt(health: HealthSnapshot) -> DoneEvent:
        ranking = rank(groups, intent, health, needed_tokens, features=features,
                       band=state.settings.spread_score_band, inflight=state.executor.inflight)
        route = _Router(run, ranking, intent, reason)
        if job.stream:
            return await _stream(state, run, ranking.candidates, health, body, budget_s, route, on_start,
                                 on_chunk, wants_usage)
        completion, served = await state.executor.complete(ranking.candidates, body, run, health, budget_s)
        if not completion.get("usage"):
            completion["usage"] = _estimate(job.body, run, served)
        return DoneEvent(route=route.info(served), usage=completion["usage"], completion=completion)

    async with asyncio.timeout(budget_s()):
        return await _until_available(state, groups, claimed, budget_s, attempt)


async def _until_available(state: WorkerState, groups: list[list[Deployment]],
                           claimed: Callable[[], Awaitable[HealthSnapshot | None]] | None,
                           budget_s: Callable[[], float],
                           attempt: Callable[[HealthSnapshot], Awaitable[DoneEvent]]) -> DoneEvent:
    """`attempt` with the candidates' health (the claim's read first), again after a wait while
    none of them may be tried now."""
    deployments = [d for group in groups for d in group]
    first_health = await claimed() if claimed is not None else None
    waited_s = 0.0
    while True:
        if first_health is not None and all(d.key in first_health.deployments for d in deployments):
            health, first_health = first_health, None
        else:  # later rankings, or candidates the claim's read predates (models a listing added since)
            first_health = None
            health = await state.executor.snapshot(deployments)
        try:
            return await attempt(health)
        except NoneAvailable as exc:
            wait_s = _availability_wait_s(exc, waited_s, state.settings.availability_wait_max_s, budget_s())
            if wait_s is None:
                raise
            await asyncio.sleep(wait_s)
            waited_s += wait_s


async def _embed(job: ChatJob, state: WorkerState, run: RunState, budget_s: Callable[[], float],
                 claimed: Callable[[], Awaitable[HealthSnapshot | None]] | None) -> DoneEvent:
    """Route and run one embeddings job inside its vector space (router/embeddings.py)."""
    body = job.body
    groups = embedding_groups(state.catalog, job.requested_model)
    expected = input_count(body)

    async def attempt(health: HealthSnapshot) -> DoneEvent:
        # Every candidate shares one space and has no chat scores: the band spreads them all.
        ranking = rank(groups, "general", health, longest_input_tokens(body), features=embedding_needs(body),
                       band=state.settings.spread_score_band, inflight=state.executor.inflight)
        (vectors, counted), served = await state.executor.embed(
            ranking.candidates, body, run, health, budget_s, lambda answer: parse_answer(answer, expected))
        tokens = counted if counted is not None else estimated_prompt_tokens(body)
        route = _Router(run, ranking, "general", "").info(served).model_copy(update={"intent": None,
                                                                                     "intent_reason": None})
        return DoneEvent(route=route, usage={"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
                         completion=encode_answer(vectors, served.model.id, tokens, body.get("encoding_format")))

    return await _until_available(state, groups, claimed, budget_s, attempt)


def _ask_for_usage(body: dict[str, Any], stream: bool) -> bool:
    """Make the upstream call stream with usage; True when the caller asked for the usage chunk.

    Non-streaming requests stream upstream too (stall detection, no truncated answers). Usage is
    asked for even when the caller said include_usage: false, because billing and tokens per
    minute need it; the usage-only chunk is then not forwarded to such a caller. Providers that
    refuse stream_options never see it (their profile drops it); when an answer comes without
    usage the worker estimates it (workers/usage_estimate.py).
    """
    caller_options = body.get("stream_options")
    if not stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return True
    wants_usage = isinstance(caller_options, dict) and bool(caller_options.get("include_usage"))
    if not wants_usage:
        options = caller_options if isinstance(caller_options, dict) else {}
        body["stream_options"] = {**options, "include_usage": True}
    return wants_usage


def _availability_wait_s(exc: NoneAvailable, waited_s: float, max_wait_s: float, budget_s: float) -> float | None:
    """How long to wait before ranking again when no candidate may be tried now (None: answer 503).

    Every candidate cooling, open or being probed by another worker for a second or two should not
    become a 503 for everyone in that second: wait for the soonest to come back, jittered so the
    waiters do not return as one herd, for at most `max_wait_s` in total and never into the
    deadline. A candidate that is gone, or a longer outage, is answered at once.
    """
    if not exc.wait_known:
        return None
    wait_s = exc.retry_after_s + random.uniform(0, 0.2)
    if waited_s + wait_s > max_wait_s or wait_s > budget_s - 1:
        return None
    return wait_s


def error_event(exc: BaseException, run: RunState) -> ErrorEvent:
    """The caller-facing error for a failed job."""
    if isinstance(exc, TimeoutError):
        return _error(504, "The request exceeded its deadline.", "timeout", run)
    if isinstance(exc, NotCapable):
        missing, param = capabilities.describe(exc.features)
        return _error(400, f"No eligible model supports {missing}. Ask without it, or for a model or capability "
                      "whose models have it (GET /v1/models lists each one's capabilities).", "unsupported_capability",
                      run, param=param)
    if isinstance(exc, NothingFits):
        return _error(400, f"The request (about {exc.needed_tokens} tokens: the conversation with max_tokens, or "
                      "the longest embeddings input) is too long for every eligible model.", "context_length_exceeded",
                      run)
    if isinstance(exc, NoneAvailable):
        return _error(503, "Every eligible model is cooling down or unavailable right now.", "no_models_available",
                      run, retry_after_s=exc.retry_after_s)
    if isinstance(exc, NoCandidates):
        return _error(503, "No model is available for this request right now.", "no_models_available", run,
                      retry_after_s=5)
    if isinstance(exc, MidStreamFailure):
        return _error(502, f"The upstream failed mid-answer: {exc.cause.message}", "upstream_failed", run)
    if isinstance(exc, ContentRejected):
        return _error(400, f"The provider refused the request: {exc.message}", "content_policy_violation", run)
    if isinstance(exc, RequestRejected):
        return _error(400, f"The provider rejected the request: {exc.message}", "invalid_request_error", run)
    if isinstance(exc, AllFailed):
        if isinstance(exc.last, ContextTooLong):
            return _error(400, "The conversation is too long for every eligible model.", "context_length_exceeded",
                          run)
        if isinstance(exc.last, NotServable) and all(a.reason == NotServable.reason for a in run.attempts):
            # Every eligible model lacks something this request needs (a field, a feature, a size).
            return _error(400, f"No eligible model can serve this request: {exc.last.message}",
                          "unsupported_parameter", run)
        return _upstream_failed(run, exc.last)
    log.error("job failed unexpectedly", exc_info=exc)
    return _error(500, "Internal error while running the request.", "internal_error", run)


class _Router:
    """A request's route metadata: where it was served and why not elsewhere (router/why.py)."""

    def __init__(self, run: RunState, ranking: Ranking, intent: Intent, reason: str) -> None:
        self._run = run
        self._ranking = ranking
        self._intent = intent
        self._reason = reason

    def info(self, served: Deployment, attempts: int | None = None) -> RouteInfo:
        """The route of an answer from `served` (attempts: failed ones + 1 unless given)."""
        run = self._run
        skipped = why.summary(self._ranking.skipped, run.notes, self._ranking.groups, served.key,
                              served.score(self._intent))
        log.debug("route to %s: %s", served.key, skipped or "first choice")
        return RouteInfo(model=served.model.id, provider=served.provider.id,
                         attempts=attempts if attempts is not None else len(run.attempts) + 1,
                         intent=self._intent, intent_reason=self._reason, skipped=skipped or None)


async def _stream(state: WorkerState, run: RunState, candidates: list[Deployment], health: HealthSnapshot,
                  body: dict[str, Any], budget_s: Callable[[], float], route: _Router, on_route: OnRoute,
                  on_chunk: OnChunk, wants_usage: bool) -> DoneEvent:
    async def on_start(deployment: Deployment, attempts: int) -> None:
        await on_route(route.info(deployment, attempts))

    served = await state.executor.stream(candidates, body, run, health, budget_s, on_start, on_chunk, wants_usage)
    usage = run.usage
    if not usage:
        usage = _estimate(body, run, served)
        if wants_usage:  # the caller asked for the usage chunk; it ends the stream as a provider's would
            await on_chunk({"id": run.stream_id or "chatcmpl-freeference", "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": served.model.id, "choices": [], "usage": usage})
    return DoneEvent(route=route.info(served), usage=usage)


def _estimate(body: dict[str, Any], run: RunState, served: Deployment) -> dict[str, Any]:
    """Usage for an answer its provider sent none for (marked estimated; logged)."""
    usage = estimated_usage(body, run.output_chars)
    log.info("no usage from %s: estimated %d prompt + %d completion tokens", served.key, usage["prompt_tokens"],
             usage["completion_tokens"])
    return usage


def _error(status: int, message: str, code: str, run: RunState, retry_after_s: float | None = None,
           param: str | None = None) -> ErrorEvent:
    error_type = {400: "invalid_request_error", 503: "service_unavailable"}.get(status, "upstream_error")
    return ErrorEvent(status=status, error=ErrorBody(message=message, type=error_type, code=code, param=param),
                      retry_after_s=retry_after_s, attempts=len(run.attempts))


def _upstream_failed(run: RunState, last: UpstreamError) -> ErrorEvent:
    providers = ", ".join(run.providers_tried) or "none"
    message = (f"All {len(run.attempts)} upstream attempts failed (providers tried: {providers}). "
               f"Last error: {last.reason}" + (f" (HTTP {last.status})" if last.status else "") +
               f": {last.message}")
    return _error(502, message, "upstream_failed", run)
