"""A streamed answer: one loop per stream from the job's replies to the socket.

Every chunk of every stream passes here, so the path is kept short (docs/performance.md,
"Many concurrent long streams"). One task per stream takes every event that came since it last
woke (JobReplies), renders them in the caller's dialect and writes them in one send; the
request's own task only waits for the caller to leave. Body messages after the first skip the
send wrappers of the middlewares that watch only a response's start and first body
(DIRECT_BODY_SEND).
"""

import asyncio
from collections.abc import Mapping

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.dialects.base import DialectStream
from api.dispatch import QUIET, Dispatcher, JobHandle, JobReplies, WorkerLost, lost_error
from api.errors import OpenAIError
from api.metrics import DIRECT_BODY_SEND
from api.relay import CALLER_LEFT, Event
from api.usage import UsageRecorder
from workers.protocol import DoneEvent, ErrorEvent


class EventStreamResponse(Response):
    """SSE for a job whose first chunk has come: `pending` holds it and whatever came with it."""

    media_type = "text/event-stream"

    def __init__(self, stream: DialectStream, pending: list[Event], replies: JobReplies, handle: JobHandle,
                 dispatcher: Dispatcher, usage: UsageRecorder, headers: Mapping[str, str]) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self._stream = stream
        self._pending = pending
        self._replies = replies
        self._handle = handle
        self._dispatcher = dispatcher
        self._usage = usage
        replies.keep_alive(stream.keepalive_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        self.raw_headers.clear()  # sent: a long stream need not keep them (nor the headers view over them)
        pump = asyncio.create_task(self._pump(send, scope.get(DIRECT_BODY_SEND, send)))
        try:
            # Answers http.disconnect when the caller leaves, and (the ASGI servers and test
            # transports alike) once the response has ended.
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            if not pump.done():
                self._handle.replies.put(CALLER_LEFT)
            await pump

    async def _pump(self, first_send: Send, body_send: Send) -> None:
        """Write the job's events until its answer ends; in-band error for a failure (the status is sent)."""
        stream, replies, usage = self._stream, self._replies, self._usage
        events, self._pending = self._pending, []
        send = first_send  # the first body passes every middleware (time to first byte)
        parts = [stream.start()]
        try:
            try:
                while True:
                    ended = await self._render(events, parts)
                    body = b"".join(parts)
                    if body or ended:
                        await send({"type": "http.response.body", "body": body, "more_body": not ended})
                        send = body_send
                    if ended:
                        return
                    parts = []
                    events = await replies.take()
            except (WorkerLost, OpenAIError) as exc:
                await usage.failed()
                failure = lost_error(exc) if isinstance(exc, WorkerLost) else exc
                await send({"type": "http.response.body", "body": stream.error(failure.body, failure.status),
                            "more_body": False})
        finally:
            replies.close()
            await usage.abandoned()  # the caller left, or the stream was cancelled; a no-op once recorded
            with anyio.CancelScope(shield=True):
                await self._dispatcher.release(self._handle)

    async def _render(self, events: list[Event], parts: list[bytes]) -> bool:
        """Append the SSE bytes of `events` to `parts`; True when the answer ended."""
        stream = self._stream
        for event_type, payload in events:
            if event_type == "chunk":
                parts.append(stream.chunk(payload))
            elif event_type == QUIET[0]:
                parts.append(stream.keepalive())
            elif event_type == CALLER_LEFT[0]:
                return True  # nobody is listening
            else:
                await self._usage.note(event_type, payload)
                if event_type == "done":
                    parts.append(stream.done(self._usage.done or DoneEvent.model_validate_json(payload)))
                    return True
                if event_type == "error":
                    # After the first byte the status is sent: the failure goes in-band.
                    error = ErrorEvent.model_validate_json(payload)
                    parts.append(stream.error(error.error, error.status))
                    return True
        return False
