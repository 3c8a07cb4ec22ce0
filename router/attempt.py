"""One streamed attempt on one deployment: forward chunks, track what the caller has, detect the end."""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from router.catalog import Deployment
from router.errors import StreamBroken, UpstreamError
from router.providers.openai_compat import OpenAICompatProvider

OnStart = Callable[[Deployment, int], Awaitable[None]]
OnChunk = Callable[[dict[str, Any]], Awaitable[None]]
# Asked once, right before an attempt would hand its first token on: True lets it (it won the
# request's first token), False means another attempt of the same request already did.
Gate = Callable[[], bool]


class HedgeLost(Exception):
    """Another attempt of the same request produced its first token first; this one stops unseen."""


@dataclass
class AttemptLog:
    deployment: str
    provider: str
    reason: str
    status: int | None
    message: str


@dataclass
class RunState:
    """What one request has done so far; the caller reads it for route metadata and errors."""

    attempts: list[AttemptLog] = field(default_factory=list)
    # Candidates passed over before any call: they cannot serve this request (their profile or
    # what they answered earlier says so). Not attempts: nothing reached their provider.
    skipped: list[AttemptLog] = field(default_factory=list)
    # Why each candidate before the one that answers did not (deployment, short reason), in order:
    # the route header and the debug log (never any request text).
    notes: list[tuple[str, str]] = field(default_factory=list)
    # Hedges this request started: (the slow deployment, its provider, "won" | "lost" | "failed").
    hedges: list[tuple[str, str, str]] = field(default_factory=list)
    chunks_sent: int = 0
    usage: dict[str, Any] | None = None
    # What the caller already holds of choice 0, so another model can continue it (prefill).
    text_sent: str = ""
    content_chunks: int = 0
    # Characters of everything generated so far (all choices, tool-call arguments, reasoning),
    # for a usage estimate when the provider sends none.
    output_chars: int = 0
    # False once anything but plain text of choice 0 went out (tool calls, n > 1): not continuable.
    continuable: bool = True
    stream_id: str | None = None

    @property
    def providers_tried(self) -> list[str]:
        return list(dict.fromkeys(a.provider for a in self.attempts))

    def forget_output(self) -> None:
        """A non-streaming attempt failed: nothing reached the caller, start over."""
        self.chunks_sent = self.content_chunks = self.output_chars = 0
        self.text_sent, self.continuable, self.stream_id, self.usage = "", True, None, None


@dataclass
class AttemptResult:
    headers: Mapping[str, str]
    first_chunk_ms: float | None


def continuation_body(body: dict[str, Any], deployment: Deployment, state: RunState) -> dict[str, Any]:
    """The request again, plus an assistant message holding what was produced so far."""
    prefill = {"role": "assistant", "content": state.text_sent, **deployment.provider.config.prefill_fields}
    continued = {**body, "messages": [*body.get("messages", []), prefill]}
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int):
            continued[name] = max(body[name] - state.content_chunks, 1)
    return continued


async def stream_attempt(provider: OpenAICompatProvider, deployment: Deployment, body: dict[str, Any],
                         api_key: str | None, budget_s: float, state: RunState, on_start: OnStart,
                         on_chunk: OnChunk, forward_usage_chunk: bool, gate: Gate | None = None) -> AttemptResult:
    """Stream one attempt to on_chunk. Raises the typed failure; returns once the answer is whole.

    Whole means a finish_reason was seen: [DONE], a closed connection or even a stall after it
    ends the attempt as a success (the usage chunk that follows the finish ends it at once).
    With a `gate` (a hedged request runs two attempts), nothing of this attempt reaches `state`
    or the caller before the gate lets its first token through; HedgeLost when it does not.
    first_chunk_ms is the time to that first token (role-only openers do not count).
    """
    continuing = state.chunks_sent > 0
    # `body` is already this provider's (router/providers/profile.py); a prefill message carries
    # only the fields its profile names (prefill_fields).
    upstream_body = continuation_body(body, deployment, state) if continuing else dict(body)
    upstream_body["model"] = deployment.model.upstream_name
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = AttemptResult(headers={}, first_chunk_ms=None)
    finished = False
    # Indices of the choices seen, and of those that finished. Counting against the seen ones,
    # not against `n`: many OpenAI-compatible servers ignore n and stream a single choice.
    seen_choices: set[int] = set()
    finished_choices: set[int] = set()
    # Content-less openers ({"role": "assistant", "content": ""}) wait for the first real chunk:
    # forwarding one would commit the stream, and failover before the first token must stay
    # invisible to the caller.
    held: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    items = provider.stream(deployment, upstream_body, api_key, budget_s)
    try:
        async for item in items:
            if item.headers is not None:
                result.headers = item.headers
                continue
            if item.done:
                break
            if item.chunk is None:
                continue  # a malformed line is skipped, the stream goes on
            chunk = item.chunk
            choices = [c for c in chunk.get("choices") or () if isinstance(c, dict)]
            # Whole only when every choice seen has finished ("error" is OpenRouter's in-band
            # failure, not an ending). Per chunk, so a plain loop.
            for choice in choices:
                index = choice.get("index", 0)
                seen_choices.add(index)
                reason = choice.get("finish_reason")
                if reason and reason != "error":
                    finished_choices.add(index)
            finished = bool(seen_choices) and seen_choices <= finished_choices
            if _role_only(choices) and (continuing or state.chunks_sent == 0):
                if not continuing:
                    held.append((chunk, choices))
                continue
            if result.first_chunk_ms is None:
                result.first_chunk_ms = (loop.time() - started) * 1000
                if gate is not None and not gate():
                    raise HedgeLost(deployment.key)
            if chunk.get("usage"):
                state.usage = chunk["usage"]
            if choices or forward_usage_chunk:
                for held_chunk, held_choices in held:
                    await _forward(deployment, held_chunk, held_choices, state, on_start, on_chunk)
                held.clear()
                await _forward(deployment, chunk, choices, state, on_start, on_chunk)
            if finished and not choices and chunk.get("usage"):
                break  # usage comes last: finalize now, do not wait for a [DONE] that may not come
    except UpstreamError:
        if not finished:
            raise
    finally:
        with contextlib.suppress(httpx.HTTPError, OSError, UpstreamError):  # closing a broken stream
            await items.aclose()  # type: ignore[attr-defined]
    if not finished:
        raise StreamBroken("upstream stream ended before the answer was complete")
    if result.first_chunk_ms is None and gate is not None and not gate():
        raise HedgeLost(deployment.key)  # an answer without a single token still must win to count
    if state.chunks_sent == 0:
        await on_start(deployment, len(state.attempts) + 1)
    return result


def _role_only(choices: list[dict[str, Any]]) -> bool:
    """The opening chunk of a continuation repeats the role; the caller already has it."""
    if len(choices) != 1:
        return False
    delta = choices[0].get("delta") or {}
    return not choices[0].get("finish_reason") and not delta.get("content") and set(delta) <= {"role", "content"}


async def _forward(deployment: Deployment, chunk: dict[str, Any], choices: list[dict[str, Any]], state: RunState,
                   on_start: OnStart, on_chunk: OnChunk) -> None:
    chunk["model"] = deployment.model.id
    if state.stream_id is None:
        state.stream_id = chunk.get("id")
    elif chunk.get("id") is not None:
        chunk["id"] = state.stream_id  # a continued answer stays one stream for the caller
    for choice in choices:
        delta = choice.get("delta") or {}
        state.output_chars += _delta_chars(delta)
        if choice.get("index", 0) != 0 or any(k not in ("role", "content", "refusal") for k in delta
                                                if delta[k] is not None):
            state.continuable = False
        elif isinstance(delta.get("content"), str) and delta["content"]:
            state.text_sent += delta["content"]
            state.content_chunks += 1
    if state.chunks_sent == 0:
        await on_start(deployment, len(state.attempts) + 1)
    await on_chunk(chunk)
    state.chunks_sent += 1


def _delta_chars(delta: dict[str, Any]) -> int:
    # Per chunk, so a plain loop: content, reasoning and refusal text, and tool-call arguments.
    chars = 0
    for name, value in delta.items():
        if type(value) is str:
            if name != "role":
                chars += len(value)
        elif name == "tool_calls" and type(value) is list:
            for call in value:
                function = call.get("function") if type(call) is dict else None
                if type(function) is dict:
                    chars += len(function.get("arguments") or "") + len(function.get("name") or "")
    return chars
