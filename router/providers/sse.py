"""Reading an upstream answer: an OpenAI-style SSE stream, or a whole JSON completion, under caps."""

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import httpx
import orjson

from router.errors import StreamBroken, UpstreamTimeout
from router.providers.stall import StallTimer
from router.providers.transport import BodyReads, body_reads
from settings.json_depth import nesting_exceeds

# How long the rest of a body after [DONE] may take to arrive. Normally it is already there (the
# chunked terminator travels with [DONE]); an upstream that holds the response open after [DONE]
# costs this much once per answer, and only its connection's reuse is lost.
_DRAIN_S = 0.05


@dataclass(frozen=True)
class BodyCaps:
    """How much of an upstream body is read (settings: upstream_*_max_bytes)."""

    error_bytes: int = 64 * 1024
    body_bytes: int = 16 * 1024 * 1024  # a whole JSON answer, or one SSE line
    stream_bytes: int = 64 * 1024 * 1024


@dataclass(slots=True)  # one per chunk of every stream
class StreamItem:
    """Either the response headers (first item), a parsed chunk, or the end marker."""

    headers: Mapping[str, str] | None = None
    chunk: dict[str, Any] | None = None
    done: bool = False
    malformed: bool = False


class TooLarge(Exception):
    """A body passed its cap; nothing more of it is read."""


async def read_capped(response: httpx.Response, cap_bytes: int) -> bytes:
    """The whole body, or TooLarge as soon as more than cap_bytes arrived (the rest stays unread)."""
    received = bytearray()
    reads = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
    try:
        async for block in reads:
            received += block
            if len(received) > cap_bytes:
                raise TooLarge
    finally:
        await reads.aclose()
    return bytes(received)


async def parse_sse(response: httpx.Response, loop: asyncio.AbstractEventLoop, started: float,
                    first_token_s: float, idle_s: float, end_by: float, caps: BodyCaps,
                    error_text: Callable[[bytes], str]) -> AsyncGenerator[StreamItem, None]:
    """Server-sent events of an OpenAI-style stream, one item per `data:` line.

    Lines are split from each network read here (not with httpx's aiter_lines), and the stall
    deadline (first token, idle gap, total) is one lazily moved timer per stream
    (router/providers/stall.py), not a timer per read or per line.
    """
    reads = body_reads(response)
    stall = StallTimer(loop, min(started + first_token_s, end_by))  # keep-alive comments are no first token
    seen_data = False
    received = 0
    # Set once the answer is whole: [DONE] is in hand, or the usage-only chunk (the last one
    # before [DONE]) is out. A consumer may stop there; the body's rest is then read when the
    # stream closes, since a response closed with unread bytes (even the chunked terminator)
    # cannot go back to the pool.
    whole = False
    pending = bytearray()  # the unfinished last line (a bytearray: an endless line grows it in place)
    try:
        while True:
            stall.begin()
            try:
                block = await reads.read()  # b"": the body ended; the caller decides whether the stream was complete
            except asyncio.CancelledError:
                if not stall.timed_out():
                    raise
                phase = "total" if loop.time() >= end_by else ("idle" if seen_data else "first_token")
                raise UpstreamTimeout(f"upstream stream stalled ({phase})", phase=phase) from None
            except httpx.HTTPError:  # read error, protocol error, decoding error
                raise StreamBroken("upstream connection was cut mid-stream") from None
            finally:
                stall.end()
            # SSE lines end in \n, \r\n or a lone \r. A \r\n split across two reads becomes an
            # extra blank line, which only separates events.
            ended = not block
            if ended:
                if not pending.strip():
                    return
                block, pending = bytes(pending), bytearray()  # a last line without a line break still counts
                lines = [block]
            else:
                received += len(block)
                if received > caps.stream_bytes:
                    raise StreamBroken(f"upstream stream over {caps.stream_bytes} bytes")
                if b"\n" not in block and b"\r" not in block:  # the middle of a long line: no split, no copy
                    pending += block
                    if len(pending) > caps.body_bytes:
                        raise StreamBroken("upstream sent an endless line")
                    continue
                if pending:
                    block = bytes(pending) + block
                    pending = bytearray()
                if b"\r" in block:
                    block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                lines = block.split(b"\n")
                last = lines.pop()  # the unfinished last line, completed by the next read
                if last:
                    if len(last) > caps.body_bytes:
                        raise StreamBroken("upstream sent an endless line")
                    pending += last
            whole = whole or (b"[DONE]" in block and any(line.startswith(b"data:") and line[5:].strip() == b"[DONE]"
                                                          for line in lines))
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": keep-alive" comments, event: lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    yield StreamItem(done=True)
                    return
                seen_data = True
                stall.deadline = min(loop.time() + idle_s, end_by)
                item = _parse_event(data)
                chunk = item.chunk
                if chunk is not None:
                    if "error" in chunk:
                        raise StreamBroken(f"upstream reported an error mid-stream: {error_text(data)}")
                    whole = whole or (not chunk.get("choices") and bool(chunk.get("usage")))
                yield item
            if ended:
                return
    finally:
        stall.close()
        if whole:  # [DONE] and the body's end are in hand or in flight
            await _finish_body(reads, loop.time() + _DRAIN_S)
        await reads.aclose()  # explicitly: a generator left to the GC costs a loop wake-up to close


def completion_chunks(completion: dict[str, Any]) -> list[StreamItem]:
    """A whole chat.completion (an upstream that ignored stream: true) as the chunks a stream has."""
    choices = completion.get("choices")
    if not isinstance(choices, list):
        return [StreamItem(malformed=True)]
    base: dict[str, Any] = {k: completion[k] for k in ("id", "created", "model", "system_fingerprint")
                            if k in completion}
    items: list[StreamItem] = []
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            return [StreamItem(malformed=True)]
        delta = {k: v for k, v in choice["message"].items() if v is not None}
        if isinstance(delta.get("tool_calls"), list):
            delta["tool_calls"] = [{**call, "index": n} for n, call in enumerate(delta["tool_calls"])
                                   if isinstance(call, dict)]
        chunk = {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": choice.get("index", i), "delta": delta,
                              "finish_reason": choice.get("finish_reason") or "stop"}]}
        items.append(_checked(chunk))
    if completion.get("usage"):
        items.append(StreamItem(chunk={**base, "object": "chat.completion.chunk", "choices": [],
                                       "usage": completion["usage"]}))
    return [*items, StreamItem(done=True)]


def _checked(chunk: dict[str, Any]) -> StreamItem:
    return StreamItem(chunk=chunk) if well_formed(chunk) else StreamItem(malformed=True)


# A chunk nested deeper than this is garbage: it could not be serialized again on its way to the
# caller (settings/json_depth.py). Chat chunks nest about six levels.
_MAX_CHUNK_DEPTH = 64


def _parse_event(data: bytes) -> StreamItem:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return StreamItem(malformed=True)
    if not isinstance(chunk, dict) or nesting_exceeds(chunk, _MAX_CHUNK_DEPTH, data):
        return StreamItem(malformed=True)
    return StreamItem(chunk=chunk) if "error" in chunk else _checked(chunk)


async def _finish_body(reads: BodyReads, drain_by: float) -> None:
    try:
        async with asyncio.timeout_at(drain_by):
            while await reads.read():
                pass
    except (TimeoutError, httpx.HTTPError):
        pass  # the answer is complete; only connection reuse is lost


def well_formed(chunk: dict[str, Any]) -> bool:
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
