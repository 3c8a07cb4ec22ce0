"""One request's job, from admission to the last byte, in whichever dialect the caller speaks.

The chat route and the dialect routes (api/dialects/) all come here: admission and enqueue in
one round trip, a silent retry when a worker dies before the first token, the status held until
the first chunk (so every failure before it has its real status code), then the answer rendered
by the request's dialect. Every answer carries admission's x-ratelimit-* headers.
"""

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from api.admission import Admission, admit
from api.dialects.base import Answer, Dialect
from api.dispatch import Dispatcher, JobHandle, WorkerLost, lost_error
from api.errors import OpenAIError
from api.event_stream import EventStreamResponse
from api.intake import admit_and_enqueue, build_job
from api.keys import KeyRecord
from api.modelref import check_chat_request
from api.relay import CALLER_LEFT
from api.usage import UsageRecorder
from settings import Settings
from settings.catalog import CatalogFile
from workers.protocol import ChatJob, DoneEvent, ErrorEvent, RouteInfo, new_job_id

# A worker that dies before the first token costs the caller one silent retry, not an error.
MAX_WORKER_LOSS_RETRIES = 1

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _route_headers(request_id: str, route: RouteInfo | None) -> dict[str, str]:
    headers = {"x-request-id": request_id}
    if route is not None:
        headers["x-freeference-model"] = route.model
        headers["x-freeference-provider"] = route.provider
        headers["x-freeference-attempts"] = str(route.attempts)
        if route.intent:
            headers["x-freeference-intent"] = route.intent
        if route.intent_reason:
            # Header values must be latin-1; the reason is short ASCII from the classifier.
            headers["x-freeference-intent-reason"] = route.intent_reason.encode("ascii", "replace").decode()[:200]
        if route.skipped:
            # What was passed over and why (router/why.py): deployment names and reason words only.
            headers["x-freeference-route"] = route.skipped.encode("ascii", "replace").decode()[:512]
    return headers


def _error_from_event(payload: bytes) -> OpenAIError:
    event = ErrorEvent.model_validate_json(payload)
    headers = {}
    if event.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(event.retry_after_s)))
    error = OpenAIError(event.status, event.error.message, code=event.error.code, param=event.error.param,
                        type_=event.error.type, headers=headers)
    return error


class _CallerWatch:
    """Turns the caller's disconnect into a CALLER_LEFT event in the current job's replies.

    One task per request instead of racing a task per event against the disconnect: every
    reply event then reaches the route with a plain await.
    """

    def __init__(self, request: Request) -> None:
        self._handle: JobHandle | None = None
        self._left = False
        self._task = asyncio.ensure_future(self._watch(request))

    def follow(self, handle: JobHandle) -> None:
        self._handle = handle
        if self._left:
            handle.replies.put(CALLER_LEFT)

    def stop(self) -> None:
        """From here on the streaming response listens for the disconnect itself."""
        self._task.cancel()

    async def _watch(self, request: Request) -> None:
        # The body was already read, so the next ASGI message is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._left = True
        if self._handle is not None:
            self._handle.replies.put(CALLER_LEFT)


# The job for an admitted request (raises the request's 400 / 403 / 404 / 429 before it is queued).
JobFactory = Callable[[Request, KeyRecord], Awaitable[ChatJob]]


async def serve(request: Request, dialect: Dialect) -> Response:
    """Admit, queue and answer one chat request in `dialect`.

    Takes what it needs from app.state and runs admission itself: FastAPI resolving it as five
    dependencies cost about a third as much as the whole admission round trip (docs/performance.md).
    """
    settings: Settings = request.app.state.settings
    dispatcher: Dispatcher = request.app.state.dispatcher
    catalog: CatalogFile = request.app.state.catalog
    queued = await admit_and_enqueue(request, settings, dispatcher, catalog, dialect)
    return await _serve(request, dialect, functools.partial(_chat_job, dialect=dialect), queued)


async def serve_job(request: Request, answer: Answer, job_for: JobFactory) -> Response:
    """Admit, queue and answer one request whose job `job_for` builds (embeddings): admission and
    the enqueue in two round trips, with every rule of a chat request's."""
    return await _serve(request, answer, job_for, None)


async def _serve(request: Request, answer: Answer, job_for: JobFactory,
                 queued: tuple[Admission, JobHandle] | None) -> Response:
    settings: Settings = request.app.state.settings
    dispatcher: Dispatcher = request.app.state.dispatcher
    if queued is None:  # the master key or an invalid body: admission, then the checks, then the enqueue
        admission, first = await admit(request, settings), None
    else:
        admission, first = queued
    usage = UsageRecorder(request.app.state.redis, admission, settings.usage_retention_days,
                          request.app.state.background)
    try:
        response = await _complete(request, admission.key, usage, dispatcher, first, answer, job_for)
    except OpenAIError as exc:
        await usage.failed()  # a no-op unless a job ran and ended without an outcome
        exc.headers = {**admission.headers, **exc.headers}
        raise
    response.headers.update(admission.headers)
    return response


async def _chat_job(request: Request, key: KeyRecord, dialect: Dialect) -> ChatJob:
    settings: Settings = request.app.state.settings
    catalog: CatalogFile = request.app.state.catalog
    body, raw = await dialect.translate(await request.body(), key.id)
    check_chat_request(catalog, body, key.tier, settings.max_messages)
    job = build_job(request, key.id, key.tier, body, raw, settings.request_timeout_s, catalog)
    await request.app.state.stream_limiter.acquire(request, key.id, job)  # 429 past the key's open streams
    return job


async def _complete(request: Request, key: KeyRecord, usage: UsageRecorder, dispatcher: Dispatcher,
                    first: JobHandle | None, dialect: Answer, job_for: JobFactory) -> Response:
    """Run the job (`first`: already queued by admit_and_enqueue), retrying once on a lost worker."""
    job = first.job if first is not None else await job_for(request, key)
    caller = _CallerWatch(request)
    try:
        for attempt in range(MAX_WORKER_LOSS_RETRIES + 1):
            handle = first if attempt == 0 and first is not None else await dispatcher.submit(job)
            caller.follow(handle)
            try:
                return await _respond(handle, dispatcher, caller, usage, dialect)
            except WorkerLost as lost:  # _respond already released the job
                if attempt == MAX_WORKER_LOSS_RETRIES:
                    raise lost_error(lost) from None
                job = job.model_copy(update={"job_id": new_job_id(request.app.state.hub.process_id)})
        raise AssertionError("unreachable")
    finally:
        caller.stop()


async def _respond(handle: JobHandle, dispatcher: Dispatcher, caller: _CallerWatch, usage: UsageRecorder,
                   dialect: Answer) -> Response:
    """Hold the status until the first chunk, the completion or an error arrives."""
    replies = dispatcher.follow(handle)
    usage.begin(handle.job.requested_model)
    route: RouteInfo | None = None
    handed_over = False
    try:
        while True:
            events = await replies.take()
            for i, (event_type, payload) in enumerate(events):
                if event_type == "chunk":
                    caller.stop()
                    handed_over = True
                    # From the first chunk on, nothing retries the job: a long answer need not keep
                    # the caller's messages (a long prompt) in memory while it streams.
                    handle.job = handle.job.model_copy(update={"body": {}})
                    headers = {**_SSE_HEADERS, **_route_headers(handle.job.request_id, route)}
                    return EventStreamResponse(dialect.stream(), events[i:], replies, handle, dispatcher, usage,
                                               headers)
                if event_type == CALLER_LEFT[0]:  # release() below cancels the job
                    await usage.abandoned()
                    return Response(status_code=499)
                await usage.note(event_type, payload)
                if event_type == "start":
                    route = usage.route
                elif event_type == "error":
                    raise _error_from_event(payload)
                elif event_type == "done":
                    done = usage.done or DoneEvent.model_validate_json(payload)  # usage.note parsed it already
                    headers = _route_headers(handle.job.request_id, done.route)
                    if handle.job.stream:  # a stream with no chunk at all is still a stream
                        stream = dialect.stream()
                        return StreamingResponse(_single(stream.start() + stream.done(done)),
                                                 media_type="text/event-stream", headers={**_SSE_HEADERS, **headers})
                    return Response(dialect.completion(done), media_type="application/json", headers=headers)
    except WorkerLost:
        raise  # _complete runs the job again on another worker: not this request's outcome
    except OpenAIError:
        await usage.failed()  # a deadline, or no worker took the job
        raise
    except BaseException:
        await usage.abandoned()  # cancelled
        raise
    finally:
        if not handed_over:
            replies.close()
            await dispatcher.release(handle)


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data
