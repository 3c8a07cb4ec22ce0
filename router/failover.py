"""Try candidate deployments in order until one answers (DESIGN.md §5)."""

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.catalog import Deployment
from router.errors import (
    ContentRejected,
    ContextTooLong,
    RequestRejected,
    StreamBroken,
    UpstreamError,
)
from router.providers.openai_compat import Completion, OpenAICompatProvider

log = logging.getLogger("freeference.failover")


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
    chunks_sent: int = 0
    usage: dict[str, Any] | None = None

    @property
    def providers_tried(self) -> list[str]:
        return list(dict.fromkeys(a.provider for a in self.attempts))


class AllFailed(Exception):
    """Every eligible candidate failed; carries the last typed failure."""

    def __init__(self, last: UpstreamError) -> None:
        super().__init__(last.message)
        self.last = last


class MidStreamFailure(Exception):
    """The answer broke after chunks reached the caller and could not be continued."""

    def __init__(self, cause: UpstreamError) -> None:
        super().__init__(cause.message)
        self.cause = cause


OnStart = Callable[[Deployment, int], Awaitable[None]]
OnChunk = Callable[[dict[str, Any]], Awaitable[None]]


def _fatal_for_request(error: UpstreamError) -> bool:
    """Failures that the caller must see instead of another model's answer."""
    return isinstance(error, ContentRejected | RequestRejected)


class FailoverExecutor:
    def __init__(self, provider: OpenAICompatProvider, pick_key: Callable[[Deployment], str | None]) -> None:
        self._provider = provider
        self._pick_key = pick_key

    def _eligible(self, candidates: Sequence[Deployment], min_context: int) -> list[Deployment]:
        return [c for c in candidates if c.model.context_window > min_context]

    async def complete(self, candidates: Sequence[Deployment], body: dict[str, Any], state: RunState,
                       budget_s: Callable[[], float]) -> tuple[Completion, Deployment]:
        """Non-streaming: the first deployment that returns a whole completion."""
        last: UpstreamError | None = None
        min_context = 0
        for deployment in candidates:
            if deployment.model.context_window <= min_context:
                continue
            try:
                completion = await self._provider.complete(
                    deployment, {**body, "model": deployment.model.upstream_name},
                    self._pick_key(deployment), budget_s())
            except UpstreamError as exc:
                self._record(state, deployment, exc)
                if _fatal_for_request(exc):
                    raise
                if isinstance(exc, ContextTooLong):
                    min_context = deployment.model.context_window
                last = exc
                continue
            completion.body["model"] = deployment.model.id
            return completion, deployment
        raise AllFailed(last or UpstreamError("no eligible deployment"))

    async def stream(self, candidates: Sequence[Deployment], body: dict[str, Any], state: RunState,
                     budget_s: Callable[[], float], on_start: OnStart, on_chunk: OnChunk,
                     forward_usage_chunk: bool) -> Deployment:
        """Streaming: fail over invisibly until the first chunk has been forwarded."""
        last: UpstreamError | None = None
        min_context = 0
        for deployment in candidates:
            if deployment.model.context_window <= min_context:
                continue
            try:
                await self._stream_one(deployment, body, state, budget_s(), on_start, on_chunk,
                                       forward_usage_chunk)
                return deployment
            except UpstreamError as exc:
                self._record(state, deployment, exc)
                if state.chunks_sent:
                    raise MidStreamFailure(exc) from exc
                if _fatal_for_request(exc):
                    raise
                if isinstance(exc, ContextTooLong):
                    min_context = deployment.model.context_window
                last = exc
        raise AllFailed(last or UpstreamError("no eligible deployment"))

    async def _stream_one(self, deployment: Deployment, body: dict[str, Any], state: RunState, budget_s: float,
                          on_start: OnStart, on_chunk: OnChunk, forward_usage_chunk: bool) -> None:
        upstream_body = {**body, "model": deployment.model.upstream_name}
        finished = False
        announced = False
        async for item in self._provider.stream(deployment, upstream_body, self._pick_key(deployment), budget_s):
            if item.done:
                break
            chunk = item.chunk
            if chunk is None:
                continue  # headers item, or a malformed chunk that is skipped
            chunk["model"] = deployment.model.id
            if chunk.get("usage"):
                state.usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if any(c.get("finish_reason") for c in choices if isinstance(c, dict)):
                finished = True
            if not choices and not forward_usage_chunk:
                continue
            if not announced:
                await on_start(deployment, len(state.attempts) + 1)
                announced = True
            await on_chunk(chunk)
            state.chunks_sent += 1
        else:
            # The upstream closed without [DONE]: whole if a finish_reason was seen.
            if not finished:
                raise StreamBroken("upstream stream ended before the answer was complete")
        if not announced:
            await on_start(deployment, len(state.attempts) + 1)

    @staticmethod
    def _record(state: RunState, deployment: Deployment, exc: UpstreamError) -> None:
        state.attempts.append(AttemptLog(deployment.key, deployment.provider.id, exc.reason, exc.status,
                                         exc.message))
        log.info("attempt on %s failed: %s", deployment.key, exc.reason)
