"""One adapter for every OpenAI-compatible provider, configured by catalog data."""

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import httpx
import orjson

from router.catalog import Deployment
from router.errors import (
    ContentRejected,
    ContextTooLong,
    ModelUnavailable,
    RateLimited,
    RequestRejected,
    StreamBroken,
    UpstreamAuthFailed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamServerError,
    UpstreamTimeout,
)
from router.providers.sanitize import sanitize

_CONTEXT_MARKERS = ("context_length", "context length", "maximum context", "too many tokens",
                    "prompt is too long", "reduce the length")
_BAD_KEY_MARKERS = ("api_key_invalid", "api key not valid", "invalid api key", "invalid_api_key")
_POLICY_MARKERS = ("content_policy", "content policy", "content_filter", "safety", "moderation",
                   "flagged", "responsible ai")


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from Retry-After (seconds or HTTP date) or retry-after-ms."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None


def _error_text(body: bytes) -> tuple[str, str]:
    """(message, code) from an OpenAI-style error body, or the raw text."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return sanitize(body.decode("utf-8", "replace")) or "no error body", ""
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("detail") or error)
        code = str(error.get("code") or error.get("type") or "")
        return sanitize(message), code
    return sanitize(str(error)), ""


def error_for_status(status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    """Map a non-2xx upstream response to its typed failure."""
    message, code = _error_text(body)
    lowered = f"{code} {message}".lower()
    if status == 429 or (status == 413 and "rate_limit" in lowered):  # Groq: tokens-per-minute as 413
        return RateLimited(message, retry_after_s=parse_retry_after(headers))
    if any(m in lowered for m in _POLICY_MARKERS) and status in (400, 403, 422):
        # OpenRouter answers moderation blocks with 403: a refusal, not a bad key of ours.
        return ContentRejected(message, status=400)
    if status in (401, 402, 403) or any(m in lowered for m in _BAD_KEY_MARKERS):
        # 402: the key is out of credits; Gemini reports an invalid key as 400 API_KEY_INVALID.
        return UpstreamAuthFailed(message, status=status)
    if status == 404 or "decommissioned" in lowered:
        return ModelUnavailable(message, status=status)
    if status == 408:
        return UpstreamTimeout(message, phase="total")
    if status in (400, 413, 422):
        if any(m in lowered for m in _CONTEXT_MARKERS):
            return ContextTooLong(message, status=400)
        if any(m in lowered for m in _POLICY_MARKERS):
            return ContentRejected(message, status=400)
        if "model" in lowered and ("not found" in lowered or "does not exist" in lowered):
            return ModelUnavailable(message, status=status)
        return RequestRejected(message, status=status)
    if status >= 500:
        return UpstreamServerError(message, status=status)
    return RequestRejected(message, status=status)


class OpenAICompatProvider:
    """POST {base_url}/chat/completions with the provider's key and extra headers."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    @staticmethod
    def _headers(deployment: Deployment, api_key: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **deployment.provider.config.headers}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    @staticmethod
    def _url(deployment: Deployment) -> str:
        return f"{deployment.provider.base_url}/chat/completions"

    @staticmethod
    def _timeout(deployment: Deployment, budget_s: float) -> httpx.Timeout:
        t = deployment.provider.config.timeout
        return httpx.Timeout(connect=min(t.connect_s, budget_s), read=min(t.total_s, budget_s),
                             write=min(t.connect_s, budget_s), pool=min(t.connect_s, budget_s))

    async def stream(self, deployment: Deployment, body: dict[str, Any], api_key: str | None,
                     budget_s: float) -> AsyncIterator["StreamItem"]:
        """Yield parsed chunks; raises typed errors for faults, timeouts and cuts."""
        t = deployment.provider.config.timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        end_by = started + min(t.total_s, budget_s)
        request = self._client.build_request("POST", self._url(deployment), content=orjson.dumps(body),
                                             headers=self._headers(deployment, api_key),
                                             timeout=self._timeout(deployment, budget_s))
        try:
            async with asyncio.timeout_at(min(started + t.connect_s + t.first_token_s, end_by)):
                response = await self._client.send(request, stream=True)
        except TimeoutError:
            raise UpstreamTimeout("no response headers in time", phase="first_token") from None
        except httpx.ConnectTimeout:
            raise UpstreamTimeout("connect timeout", phase="connect") from None
        except httpx.ConnectError:
            raise UpstreamConnectError("connection refused or unreachable") from None
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError, httpx.TimeoutException):
            raise UpstreamServerError("connection reset by upstream") from None
        except httpx.HTTPError as exc:  # e.g. a base URL without a scheme: this route cannot work
            raise UpstreamConnectError(f"cannot reach the provider ({type(exc).__name__})") from None
        try:
            if response.status_code >= 300:
                try:
                    async with asyncio.timeout_at(min(started + t.connect_s + t.first_token_s, end_by)):
                        error_body = await response.aread()
                except (TimeoutError, httpx.HTTPError):
                    error_body = b""  # the status alone decides
                raise error_for_status(response.status_code, error_body, response.headers)
            yield StreamItem(headers=response.headers)
            events = _parse_sse(response, loop, started, t.first_token_s, t.idle_s, end_by)
            try:
                async for item in events:
                    yield item
            finally:
                await events.aclose()
        finally:
            await response.aclose()


@dataclass
class StreamItem:
    """Either the response headers (first item), a parsed chunk, or the end marker."""

    headers: Mapping[str, str] | None = None
    chunk: dict[str, Any] | None = None
    done: bool = False
    malformed: bool = False


async def _parse_sse(response: httpx.Response, loop: asyncio.AbstractEventLoop, started: float,
                     first_token_s: float, idle_s: float, end_by: float) -> AsyncGenerator["StreamItem", None]:
    """Server-sent events of an OpenAI-style stream, one item per `data:` line.

    Lines are split from each network read here (not with httpx's aiter_lines), so the stall
    deadline is armed once per read rather than once per line: a read usually holds several
    lines, and the per-line timers were a measurable share of a worker's CPU.
    """
    reads = cast(AsyncGenerator[bytes, None], response.aiter_bytes())  # httpx types it as an iterator
    data_by = started + first_token_s  # keep-alive comments do not count as a first token
    seen_data = False
    # Set once the answer is whole: [DONE] is in hand, or the usage-only chunk (the last one
    # before [DONE]) is out. A consumer may stop there; the body's rest is then read when the
    # stream closes, since a response closed with unread bytes (even the chunked terminator)
    # cannot go back to the pool.
    whole = False
    pending = b""
    try:
        while True:
            block: bytes | None
            try:
                async with asyncio.timeout_at(min(data_by, end_by)):
                    block = await anext(reads)
            except StopAsyncIteration:
                block = None  # the body ended; the caller decides whether the stream was complete
            except TimeoutError:
                phase = "total" if loop.time() >= end_by else ("idle" if seen_data else "first_token")
                raise UpstreamTimeout(f"upstream stream stalled ({phase})", phase=phase) from None
            except httpx.HTTPError:  # read error, protocol error, decoding error, read timeout
                raise StreamBroken("upstream connection was cut mid-stream") from None
            # SSE lines end in \n, \r\n or a lone \r. A \r\n split across two reads becomes an
            # extra blank line, which only separates events.
            if block is None:
                if not pending.strip():
                    return
                lines, pending = [pending], b""  # a last line without a line break still counts
            else:
                lines = (pending + block).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
                pending = lines.pop()  # the unfinished last line, completed by the next read
                if len(pending) > _MAX_LINE_BYTES:
                    raise StreamBroken("upstream sent an endless line")
            whole = whole or any(line.startswith(b"data:") and line[5:].strip() == b"[DONE]" for line in lines)
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": keep-alive" comments, event: lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    yield StreamItem(done=True)
                    return
                seen_data = True
                data_by = loop.time() + idle_s
                item = _parse_event(data)
                if item.chunk is not None and "error" in item.chunk:
                    message, _code = _error_text(data)
                    raise StreamBroken(f"upstream reported an error mid-stream: {message}")
                whole = whole or (item.chunk is not None and not item.chunk.get("choices")
                                  and bool(item.chunk.get("usage")))
                yield item
            if block is None:
                return
    finally:
        if whole:  # [DONE] and the body's end are in hand or in flight
            await _finish_body(reads, loop.time() + _DRAIN_S)
        await reads.aclose()  # explicitly: a generator left to the GC costs a loop wake-up to close


def _parse_event(data: bytes) -> "StreamItem":
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return StreamItem(malformed=True)
    if not isinstance(chunk, dict) or not _well_formed(chunk):
        return StreamItem(malformed=True)
    return StreamItem(chunk=chunk)


# A line longer than this without a line break is not an SSE event of any provider.
_MAX_LINE_BYTES = 16 * 1024 * 1024
# How long the rest of a body after [DONE] may take to arrive. Normally it is already there (the
# chunked terminator travels with [DONE]); an upstream that holds the response open after [DONE]
# costs this much once per answer, and only its connection's reuse is lost.
_DRAIN_S = 0.05


async def _finish_body(reads: AsyncIterator[bytes], drain_by: float) -> None:
    try:
        async with asyncio.timeout_at(drain_by):
            async for _ in reads:
                pass
    except (TimeoutError, httpx.HTTPError):
        pass  # the answer is complete; only connection reuse is lost


def _well_formed(chunk: dict[str, Any]) -> bool:
    """The shapes the executor and the assembler rely on; anything else is skipped as malformed."""
    choices = chunk.get("choices", [])
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
            return False
        delta = choice.get("delta")
        if delta is None:
            continue
        if not isinstance(delta, dict) or not isinstance(delta.get("content") or "", str):
            return False
        calls = delta.get("tool_calls") or []
        if not isinstance(calls, list):
            return False
        for call in calls:
            if not isinstance(call, dict) or not isinstance(call.get("function") or {}, dict):
                return False
            if not isinstance((call.get("function") or {}).get("arguments") or "", str):
                return False
    return True
