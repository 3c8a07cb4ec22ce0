"""Pure ASGI middleware at the edge: request ids, the key check, and bounded body reads.

Everything here happens before the app reads a byte of the body, so hostile input costs the
gateway little (docs/security.md):

- a body declared larger than the limit is refused (413) at once;
- the key is checked from the headers alone (api/gate.py); an unknown key gets 401 and the
  connection is closed, its body never read;
- the body is read against a size cap (413 as soon as it is passed, chunked or not) and a
  deadline (408) that grows with the bytes that arrive, so a slow body cannot hold a
  connection and a slot for long;
- one key may have only so many slow bodies (not whole in their first read) arriving at once
  in a process (429 past that): a valid key cannot hold the process with slow uploads either;
- a caller that hangs up mid-body is an info line and status 499 in the metrics, not an error.

An answer given here, before the app answered, closes the connection: the rest of a body that
was never read must not be taken for the next request.
"""

import asyncio
import logging
import re
import uuid
from collections.abc import Collection, Mapping

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import OpenAIError, error_response, store_unavailable
from api.metrics import CLIENT_LEFT_STATE
from workers.protocol import REQUEST_ID

log = logging.getLogger("freeference.edge")

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Paths whose callers must present a key.
_KEYED_PREFIXES = ("/v1/", "/admin")
_DISCONNECT: Message = {"type": "http.disconnect"}


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large")


def too_many_bodies(limit: int) -> OpenAIError:
    return OpenAIError(429, f"This key already has {limit} request bodies arriving at this gateway process; "
                            "finish those first.", code="rate_limit_exceeded", headers={"Retry-After": "1"})


def body_too_slow(timeout_s: float) -> OpenAIError:
    return OpenAIError(408, f"The request body did not arrive in time (limit: {timeout_s:g} s, longer for a large "
                            "body that keeps arriving).", code="request_timeout")


class EdgeMiddleware:
    """See the module docstring. `path_limits` gives exact paths their own body limit (file uploads).

    `admitted_paths`: routes whose admission script checks the key again itself (api/gate.py).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float, body_min_bytes_per_s: int,
                 max_open_bodies_per_key: int, path_limits: Mapping[str, int] | None = None,
                 admitted_paths: Collection[str] = ()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.body_min_bytes_per_s = body_min_bytes_per_s
        self.max_open_bodies_per_key = max_open_bodies_per_key
        self.path_limits = dict(path_limits or {})
        self.admitted_paths = frozenset(admitted_paths)
        self._open_bodies: dict[str, int] = {}  # key digest → its bodies still arriving in this process

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, declared, chunked = _read_headers(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)  # every log line of this request names it (cli/logging_setup.py)
        send = _with_request_id(send, request_id)
        path: str = scope["path"]
        limit = self.path_limits.get(path, self.max_body_bytes)
        body_follows = chunked or (declared is not None and declared != b"0")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _refuse(too_large(limit), scope, receive, send, close=True)  # not a byte of it read
            return
        digest: str | None = None
        if path.startswith(_KEYED_PREFIXES) and scope["method"] != "OPTIONS":
            try:
                digest = await scope["app"].state.key_gate.check(scope, admission_rechecks=path in self.admitted_paths)
            except OpenAIError as exc:
                await _refuse(exc, scope, receive, send, close=body_follows)
                return
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await _refuse(store_unavailable(), scope, receive, send, close=body_follows)
                return
        if not body_follows:
            await self.app(scope, receive, send)
            return
        body = _BoundedBody(scope, receive, send, limit, self.body_timeout_s, self.body_min_bytes_per_s,
                            None if digest is None else _Arriving(self._open_bodies, digest,
                                                                  self.max_open_bodies_per_key))
        try:
            await self.app(scope, body.receive, body.send)
        finally:
            body.finish()
            if body.client_left:
                log.info("client went away before its request body was complete (%d bytes received)",
                         body.received)


def _read_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str, bytes | None, bool]:
    """(request id, declared content-length, chunked) in one pass over the raw headers."""
    incoming = b""
    declared: bytes | None = None
    chunked = False
    for name, value in headers:
        if name == b"x-request-id":
            incoming = value
        elif name == b"content-length":
            declared = value.strip()
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    text = incoming.decode("latin-1")
    return (text if _SAFE_REQUEST_ID.match(text) else "req_" + uuid.uuid4().hex), declared, chunked


def _with_request_id(send: Send, request_id: str) -> Send:
    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            raw = list(message.get("headers", []))
            if not any(k.lower() == b"x-request-id" for k, _ in raw):
                raw.append((b"x-request-id", request_id.encode()))
            message["headers"] = raw
        await send(message)

    return send_with_id


async def _refuse(error: OpenAIError, scope: Scope, receive: Receive, send: Send, close: bool) -> None:
    headers = {**error.headers, "Connection": "close"} if close else error.headers
    await error_response(error.status, error.body, headers, scope.get("path", ""))(scope, receive, send)


class _Arriving:
    """One key's place among the bodies arriving in this process, taken once its body turns out slow.

    A body that comes whole with its first read never takes one: only bodies that keep the app
    waiting count, so many concurrent ordinary requests of one key are never refused here.
    """

    def __init__(self, counts: dict[str, int], digest: str, limit: int) -> None:
        self._counts = counts
        self._digest = digest
        self.limit = limit
        self._held = False

    def take(self) -> bool:
        """Take a place (idempotent); False when the key has `limit` bodies arriving already."""
        if self._held:
            return True
        arriving = self._counts.get(self._digest, 0)
        if arriving >= self.limit:
            return False
        self._counts[self._digest] = arriving + 1
        self._held = True
        return True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        left = self._counts.get(self._digest, 1) - 1
        if left > 0:
            self._counts[self._digest] = left
        else:
            self._counts.pop(self._digest, None)


class _BoundedBody:
    """The app's receive and send for one request whose body is read against a cap and a deadline.

    When the cap or the deadline is passed, the answer (413 / 408, connection closed) goes out
    at once and the app is told the caller left; whatever the app sends after that is dropped.
    """

    def __init__(self, scope: Scope, receive: Receive, send: Send, limit: int, timeout_s: float,
                 min_bytes_per_s: int, arriving: _Arriving | None) -> None:
        self._arriving = arriving  # the key's place while its body keeps the app waiting (None: master key)
        self._scope = scope
        self._receive = receive
        self._send = send
        self._limit = limit
        self._timeout_s = timeout_s
        self._min_bytes_per_s = max(min_bytes_per_s, 1)
        self._started = asyncio.get_running_loop().time()
        self.received = 0
        self.complete = False
        self.client_left = False
        self._response_started = False
        self._answered = False

    def _deadline(self) -> float:
        # A body that keeps arriving at the minimum rate earns the time it needs.
        return self._started + self._timeout_s + self.received / self._min_bytes_per_s

    async def receive(self) -> Message:
        if self._answered:
            return _DISCONNECT
        if self.complete:
            return await self._receive()  # after the body: only the disconnect is left to hear
        try:
            async with asyncio.timeout_at(self._deadline()):
                message = await self._receive()
        except TimeoutError:
            return await self._answer(body_too_slow(self._timeout_s))
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self._limit:
                return await self._answer(too_large(self._limit))
            if not message.get("more_body", False):
                self.complete = True
                self.finish()
            elif self._arriving is not None and not self._arriving.take():
                return await self._answer(too_many_bodies(self._arriving.limit))
        elif message["type"] == "http.disconnect":
            self.client_left = True
            self._scope["state"][CLIENT_LEFT_STATE] = True
        return message

    def finish(self) -> None:
        """The body is whole, or the request ended without it: it no longer counts as arriving."""
        if self._arriving is not None:
            self._arriving.release()

    async def send(self, message: Message) -> None:
        if self._answered:
            return  # the edge answered for the app already
        if message["type"] == "http.response.start":
            self._response_started = True
        await self._send(message)

    async def _answer(self, error: OpenAIError) -> Message:
        self._answered = True
        if not self._response_started:
            await _refuse(error, self._scope, _no_receive, self._send, close=True)
        return _DISCONNECT


async def _no_receive() -> Message:
    return _DISCONNECT

