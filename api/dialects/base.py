"""A wire format the API speaks, translated at the edge onto the one chat job (api/pipeline.py).

Every dialect rides the same path: its request becomes a chat completion request (validated by
the same model and checks as /v1/chat/completions), the job is admitted, queued, routed and
failed over like any other, and its events come back as chat chunks and a chat completion,
which the dialect turns into its own answer. Nothing below the API knows which dialect a
caller spoke.
"""

from typing import Any, Protocol

import orjson

from api.schemas import ChatCompletionRequest, parse_chat_request
from workers.protocol import DoneEvent, ErrorBody


class DialectStream(Protocol):
    """One streamed answer in a dialect: SSE bytes for each job event, in order."""

    # Seconds of quiet after which keepalive() goes out (None: never).
    keepalive_s: float | None

    def keepalive(self) -> bytes:
        """What goes out when the stream has been quiet for keepalive_s."""

    def start(self) -> bytes:
        """What goes out before the first chunk (the status is already decided)."""

    def chunk(self, payload: bytes) -> bytes:
        """One chat.completion.chunk (its JSON, as the worker published it)."""

    def done(self, done: DoneEvent) -> bytes:
        """The end of a whole answer."""

    def error(self, error: ErrorBody, status: int) -> bytes:
        """A failure after the first event: in-band, and never the dialect's success ending."""


class Answer(Protocol):
    """How one request's answer is written: created per request, it keeps what the answer needs."""

    def completion(self, done: DoneEvent) -> bytes:
        """The whole (non-streaming) answer's JSON body."""

    def stream(self) -> DialectStream:
        """A fresh translator for a streamed answer."""


class Dialect(Answer, Protocol):
    """One request in one wire format translated onto a chat request, and its answer."""

    async def translate(self, raw: bytes, key_id: str) -> tuple[ChatCompletionRequest, dict[str, Any]]:
        """The chat request for this body (400 OpenAIError when it is invalid in this dialect)."""


class ChatStream:
    """Chat completions: chunks pass through byte for byte."""

    keepalive_s: float | None = None

    def keepalive(self) -> bytes:
        return b""

    def start(self) -> bytes:
        return b""

    def chunk(self, payload: bytes) -> bytes:
        return b"data: " + payload + b"\n\n"

    def done(self, done: DoneEvent) -> bytes:
        return b"data: [DONE]\n\n"

    def error(self, error: ErrorBody, status: int) -> bytes:
        # No [DONE] after it, so no client mistakes a truncated answer for a whole one.
        return b"data: " + orjson.dumps({"error": error.model_dump()}) + b"\n\n"


class ChatDialect:
    """OpenAI chat completions, the gateway's own format."""

    def __init__(self, max_json_depth: int) -> None:
        self._max_json_depth = max_json_depth

    async def translate(self, raw: bytes, key_id: str) -> tuple[ChatCompletionRequest, dict[str, Any]]:
        return parse_chat_request(raw, self._max_json_depth)

    def completion(self, done: DoneEvent) -> bytes:
        return orjson.dumps(done.completion) if done.completion is not None else b"{}"

    def stream(self) -> DialectStream:
        return ChatStream()
