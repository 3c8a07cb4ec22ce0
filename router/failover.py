"""Try ranked deployments, following the policy table for each failure (DESIGN.md §5).

Before the first chunk reaches the caller a failure is invisible: retry or fail over. After it,
the answer continues on a deployment that supports an assistant prefix (prefill), or the
failure is reported in-band. Non-streaming requests stream upstream as well and assemble the
answer, so a cut is retried from scratch and a truncated completion is never returned.

A first token later than the deployment's own history starts the next candidate beside it
(router/hedge.py); exactly one attempt passes the request's first-token gate, and the other is
cancelled before anything of it reaches the caller.
"""

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from router import capabilities
from router.assemble import CompletionAssembler
from router.attempt import AttemptLog, AttemptResult, HedgeLost, OnChunk, OnStart, RunState, stream_attempt
from router.catalog import Deployment
from router.embeddings import embedding_body
from router.errors import ContextTooLong, NotServable, UpstreamError, UpstreamTimeout
from router.health import HealthSnapshot, HealthStore, now_ms
from router.hedge import HedgePolicy, HedgeTuning
from router.keys import KeyRotation, NoUsableKey
from router.learning import MODEL_GONE_COOLDOWN_S, HealthLearner
from router.policy import POLICY, Tuning, classify, retry_wait_s
from router.providers.openai_compat import OpenAICompatProvider
from router.providers.profile import droppable
from router.providers.slots import ProviderSlots
from router.select import NoneAvailable, window

__all__ = ["MODEL_GONE_COOLDOWN_S", "AllFailed", "AttemptLog", "FailoverExecutor", "MidStreamFailure", "RunState"]

log = logging.getLogger("freeference.failover")

# Retry-After for a request whose candidates were all being probed by other workers.
_BUSY_RETRY_AFTER_S = 1.0
# A retry wait must leave at least this much of the request's budget for the retry itself.
_MIN_ATTEMPT_BUDGET_S = 0.5
# Features learned per request rather than per deployment: a per-request size cap says nothing
# about the next request (its stated limit is learned as a window instead).
_UNLEARNED = frozenset({"tokens"})


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


Sleep = Callable[[float], Awaitable[None]]
_Parsed = TypeVar("_Parsed")
Outcome_ = AttemptResult | UpstreamError | None  # None: lost a hedge (nothing learned)


@dataclass
class _Try:
    """One candidate being tried: its prepared body, key, probe claim and retries so far."""

    deployment: Deployment
    body: dict[str, Any]
    probe: bool
    api_key: str | None = None
    retries: int = 0


@dataclass
class _Request:
    """One request's run through its candidates."""

    pending: collections.deque[Deployment]
    ranked: Sequence[Deployment]
    body: dict[str, Any]
    state: RunState
    health: HealthSnapshot
    budget_s: Callable[[], float]
    on_start: OnStart
    on_chunk: OnChunk
    forward_usage_chunk: bool
    visible: bool
    restart: Callable[[], None] | None
    embeddings: bool = False  # an embeddings request: its body is router.embeddings's, not a chat profile's
    min_tokens: int = 0  # after a context refusal: what any later candidate's window must hold
    last: UpstreamError | None = None

    @functools.cached_property
    def needs(self) -> frozenset[str]:
        """What a deployment may have said it lacks that this request uses (read only when one has)."""
        return capabilities.request_needs(self.body)


@dataclass
class _Race:
    """The first-token gate of one attempt and, if it was slow, its hedge."""

    primary: _Try
    primary_task: asyncio.Task[Any] | None
    winner: _Try | None = None
    hedge: _Try | None = None
    hedge_task: asyncio.Task[tuple[_Try, Outcome_] | None] | None = None
    primary_running: bool = True
    primary_cancelled: bool = False
    timer: asyncio.TimerHandle | None = None


class LocalLoad(Protocol):
    """How this worker process itself is doing (workers/capacity.py measures it)."""

    @property
    def lagging(self) -> bool:
        """Its event loop runs late: a first token may be late here, not at the provider."""

    @property
    def overwhelmed(self) -> bool:
        """So late that a timeout seen now is this process's, not the provider's."""


class _NoLocalLoad:
    lagging = False
    overwhelmed = False


class FailoverExecutor:
    def __init__(self, provider: OpenAICompatProvider, rotation: KeyRotation, health: HealthStore | None,
                 tuning: Tuning, sleep: Sleep = asyncio.sleep, hedging: HedgeTuning | None = None,
                 local: LocalLoad | None = None) -> None:
        self._provider = provider
        self._rotation = rotation
        self._tuning = tuning
        self._sleep = sleep
        self.learner = HealthLearner(health, tuning)
        self.hedging = HedgePolicy(hedging or HedgeTuning(enabled=False))
        # Attempts in flight per deployment in this worker (spreading prefers the less busy).
        self.inflight: collections.Counter[str] = collections.Counter()
        # Upstream requests per provider with a concurrency limit wait here, before their clocks start.
        self.slots = ProviderSlots()
        # How late this process's own event loop runs: a timeout or a late first token seen
        # then says more about this worker than about the provider.
        self._local = local or _NoLocalLoad()

    async def snapshot(self, deployments: Sequence[Deployment]) -> HealthSnapshot:
        """Shared health of the candidates; an empty snapshot when Redis cannot tell."""
        return await self.learner.snapshot(deployments)

    async def settle(self) -> None:
        """Wait for background health writes (tests, shutdown)."""
        await self.learner.settle()

    async def complete(self, ranked: Sequence[Deployment], body: dict[str, Any], state: RunState,
                       health: HealthSnapshot, budget_s: Callable[[], float]) -> tuple[dict[str, Any], Deployment]:
        """Non-streaming: a whole chat.completion from the first deployment that finishes one."""
        assembler = CompletionAssembler()
        served = await self._run(_Request(collections.deque(ranked), ranked, body, state, health, budget_s, _no_start,
                                          assembler.add, forward_usage_chunk=True, visible=False,
                                          restart=assembler.reset))
        return assembler.result(served.model.id), served

    async def stream(self, ranked: Sequence[Deployment], body: dict[str, Any], state: RunState,
                     health: HealthSnapshot, budget_s: Callable[[], float], on_start: OnStart, on_chunk: OnChunk,
                     forward_usage_chunk: bool) -> Deployment:
        """Streaming: invisible failover before the first chunk, continuation (prefill) after."""
        return await self._run(_Request(collections.deque(ranked), ranked, body, state, health, budget_s, on_start,
                                        on_chunk, forward_usage_chunk=forward_usage_chunk, visible=True, restart=None))

    async def embed(self, ranked: Sequence[Deployment], body: dict[str, Any], state: RunState,
                    health: HealthSnapshot, budget_s: Callable[[], float],
                    parse: Callable[[Any], _Parsed]) -> tuple[_Parsed, Deployment]:
        """Embeddings: the first deployment's answer, as `parse` reads its JSON, failing over by the
        same policy as a chat request (an answer `parse` refuses with an UpstreamError is that
        deployment's failure); `ranked` holds one vector space only (router/embeddings.py)."""
        req = _Request(collections.deque(ranked), ranked, body, state, health, budget_s, _no_start, _no_chunk,
                       forward_usage_chunk=False, visible=False, restart=None, embeddings=True)
        current: _Try | None = None
        while True:
            if current is None:
                current = await self._next(req)
                if current is None:
                    raise self._exhausted(req)
            if not await self._pick_key(current, req):
                current = None
                continue
            d = current.deployment
            try:
                # The provider's slot first (router/providers/slots.py): its wait is not the call's time.
                async with self.slots.hold(d.provider):
                    started = asyncio.get_running_loop().time()
                    with self._in_flight(d):
                        raw, headers = await self._provider.embed(d, current.body, current.api_key, budget_s())
                answer = parse(raw)
            except UpstreamError as exc:
                current = await self._failed(current, exc, req)
                continue
            except BaseException:
                if current.probe:
                    await asyncio.shield(self.learner.release_probe(d))
                raise
            took_ms: float | None = (asyncio.get_running_loop().time() - started) * 1000
            if current.probe:
                self.learner.in_background(self.learner.probe_answered(d, None))
            took_ms = None if self._local.overwhelmed else took_ms
            self.learner.in_background(self.learner.succeeded(d, current.api_key, took_ms, headers, req.health))
            return answer, d

    async def _run(self, req: _Request) -> Deployment:
        current: _Try | None = None
        while True:
            if current is None:
                current = await self._next(req)
                if current is None:
                    break
            if not await self._pick_key(current, req):
                current = None
                continue
            if req.restart is not None:
                req.restart()
                req.state.forget_output()
            finished = await self._attempt(current, req)
            *earlier, (counted, outcome) = finished
            for tried, failure in earlier:  # a hedge race's other attempt, failed first: learned only
                if isinstance(failure, UpstreamError):
                    await self._failed(tried, failure, req, decide=False)
            if isinstance(outcome, AttemptResult):
                # Recording success must not delay the answer: the caller's done event goes first.
                first_chunk_ms = None if self._local.overwhelmed else outcome.first_chunk_ms
                self.learner.in_background(self.learner.succeeded(
                    counted.deployment, counted.api_key, first_chunk_ms, outcome.headers, req.health))
                return counted.deployment
            current = await self._failed(counted, outcome, req) if outcome is not None else None
        raise self._exhausted(req)

    @staticmethod
    def _exhausted(req: _Request) -> Exception:
        """What a request whose candidates are all used up ends with."""
        state = req.state
        if req.last is None:
            if state.skipped and len(state.skipped) == len(req.ranked):
                # Every candidate lacks something this request needs: no upstream call can help.
                return AllFailed(NotServable(state.skipped[-1].message))
            # Nothing was tried: every candidate was being probed by another worker or had no
            # usable key left. That is "unavailable right now", not an upstream failure.
            return NoneAvailable(_BUSY_RETRY_AFTER_S)
        if req.visible and state.chunks_sent > 0:
            return MidStreamFailure(req.last)
        return AllFailed(req.last)

    async def _next(self, req: _Request) -> _Try | None:
        """The next candidate that may be tried for this request (its probe claimed), or None."""
        state, health = req.state, req.health
        while req.pending:
            d = req.pending.popleft()
            if window(d, health) < req.min_tokens:
                state.notes.append((d.key, "window"))
                continue
            if req.visible and state.chunks_sent > 0 and not (state.continuable and d.model.supports_prefill):
                continue
            try:
                body = self._prepare(d, req)
            except NotServable as exc:  # known before any call: skipped, nothing to learn
                state.skipped.append(AttemptLog(d.key, d.provider.id, exc.reason, None, exc.message))
                state.notes.append((d.key, f"unsupported:{exc.feature}" if exc.feature else "unsupported"))
                continue
            probe = health.of(d).state(health.at_ms) == "half_open"
            if probe and not await self.learner.claim_probe(d):
                state.notes.append((d.key, "breaker"))  # another worker is probing it right now
                continue
            return _Try(d, body, probe)
        return None

    async def _pick_key(self, t: _Try, req: _Request) -> bool:
        try:
            t.api_key = self._rotation.pick(t.deployment, req.health)
        except NoUsableKey:
            req.state.notes.append((t.deployment.key, "quota"))
            if t.probe:
                await self.learner.release_probe(t.deployment)  # let a worker with a key probe it
            return False
        return True

    def _prepare(self, d: Deployment, req: _Request) -> dict[str, Any]:
        """The body for this deployment (its profile applied, fields it refused dropped), or
        NotServable before any call when it said it lacks something this request needs."""
        if req.embeddings:
            return embedding_body(d, req.body)
        marks = req.health.of(d).unsupported
        body = req.body
        if marks:
            now = req.health.at_ms
            refused = {name for name, until in marks.items() if until > now and name in req.needs}
            for name in refused:
                if name not in body or not droppable(name, body[name]):
                    raise NotServable(f"{d.key} answered earlier that it does not support {name}", feature=name)
            if refused:
                body = {k: v for k, v in body.items() if k not in refused}
        return self._provider.prepare(d, body)

    async def _attempt(self, t: _Try, req: _Request) -> list[tuple[_Try, Outcome_]]:
        """Run one attempt, hedged if its first token is late: the attempts that finished, in
        order, the last being the one whose outcome counts."""
        # The provider's slot first: waiting for it is this worker's queue, so no clock of the
        # attempt (its timeouts, its first-token time, the hedge timer) runs meanwhile.
        async with self.slots.hold(t.deployment.provider):
            return await self._attempt_in_slot(t, req)

    async def _attempt_in_slot(self, t: _Try, req: _Request) -> list[tuple[_Try, Outcome_]]:
        d = t.deployment
        self.hedging.started(d.key)
        threshold_s = self.hedging.threshold_s(req.health.of(d))
        hedgeable = (self.hedging.tuning.enabled and req.state.chunks_sent == 0 and t.retries == 0
                     and bool(req.pending) and threshold_s < req.budget_s() - _MIN_ATTEMPT_BUDGET_S
                     and (t.probe or self.hedging.may_hedge(d.key)))
        if not hedgeable:
            return [(t, await self._stream(t, req, self._probe_gate(t) if t.probe else None))]
        # The primary runs in this task (no task of its own on the hot path); a timer starts the
        # hedge in a task only when the first token is late.
        race = _Race(t, asyncio.current_task())
        race.timer = asyncio.get_running_loop().call_later(threshold_s, self._start_hedge, race, req)
        outcome: Outcome_
        try:
            outcome = await self._stream(t, req, self._gate(race, t, req))
        except (asyncio.CancelledError, HedgeLost) as exc:
            task = asyncio.current_task()
            ours = race.primary_cancelled and (not isinstance(exc, asyncio.CancelledError)
                                               or (task is not None and task.uncancel() == 0))
            if not ours:
                if race.hedge_task is not None:
                    race.hedge_task.cancel()  # the caller went away: the hedge goes too
                raise
            outcome = None  # the hedge's first token came first: this attempt stopped unseen
        finally:
            race.primary_running = False
            race.timer.cancel()
        return await self._settle(race, outcome, req)

    async def _settle(self, race: _Race, outcome: Outcome_, req: _Request) -> list[tuple[_Try, Outcome_]]:
        """Once the primary is done: what became of the race (see _attempt)."""
        t, hedge_task = race.primary, race.hedge_task
        if hedge_task is None:
            return [(t, outcome)]
        refusal = isinstance(outcome, UpstreamError) and POLICY[classify(outcome, self._tuning)].then == "return"
        if race.winner is t or refusal:
            # The primary's first token came first, or it answered with the caller's own error (a
            # safety refusal is not routed around): the hedge stops unseen.
            hedge_task.cancel()
            await _joined(hedge_task)
            if race.hedge is not None:
                self._hedged(race, req, "lost")
            return [(t, outcome)]
        # The hedge won, or the primary failed before its first token: the hedge's outcome counts.
        await _joined(hedge_task)
        hedged = None if hedge_task.cancelled() else hedge_task.result()
        finished: list[tuple[_Try, Outcome_]] = [(t, outcome)] if outcome is not None else []
        if hedged is None:
            if race.hedge is not None:
                self._hedged(race, req, "failed")
            return finished or [(t, None)]
        self._hedged(race, req, "won" if race.winner is hedged[0] else "failed")
        return [*finished, hedged]

    def _start_hedge(self, race: _Race, req: _Request) -> None:
        """The primary's first token is late: start the next candidate beside it.

        Not while this worker's own loop is late: then the first token is late here, not at the
        provider, and a second attempt would only add to the load that made it late.
        """
        if race.winner is None and race.primary_running and req.pending and not self._local.lagging:
            race.hedge_task = asyncio.get_running_loop().create_task(self._run_hedge(race, req))

    async def _run_hedge(self, race: _Race, req: _Request) -> tuple[_Try, Outcome_] | None:
        hedge = await self._next(req)
        if hedge is not None and race.winner is not None:  # the primary's token came meanwhile
            req.pending.appendleft(hedge.deployment)
            await self._release(hedge)
            return None
        if hedge is None or not await self._pick_key(hedge, req):
            return None
        race.hedge = hedge
        self.hedging.hedged(race.primary.deployment.key)
        log.info("first token of %s is late: hedging on %s", race.primary.deployment.key, hedge.deployment.key)
        try:
            async with self.slots.hold(hedge.deployment.provider):
                return hedge, await self._stream(hedge, req, self._gate(race, hedge, req))
        except HedgeLost:
            return hedge, None

    def _gate(self, race: _Race, t: _Try, req: _Request) -> Callable[[], bool]:
        """`t`'s first-token gate in `race`: the first attempt to ask wins, the other one stops."""

        def gate() -> bool:
            if race.winner is not None:
                return race.winner is t
            race.winner = t
            if race.timer is not None:
                race.timer.cancel()
            if t is race.primary:
                if race.hedge_task is not None:
                    race.hedge_task.cancel()
            else:
                req.state.notes.append((race.primary.deployment.key, "hedge"))
                if race.primary_running and race.primary_task is not None:
                    race.primary_cancelled = True
                    race.primary_task.cancel()
            if t.probe:
                self.learner.in_background(self.learner.probe_answered(t.deployment, None))
            return True

        return gate

    def _probe_gate(self, t: _Try) -> Callable[[], bool]:
        """A probe's gate: its first token closes the breaker for everyone right away."""

        def gate() -> bool:
            self.learner.in_background(self.learner.probe_answered(t.deployment, None))
            return True

        return gate

    async def _stream(self, t: _Try, req: _Request, gate: Callable[[], bool] | None) -> AttemptResult | UpstreamError:
        """One streamed attempt; its typed failure returned, not raised. A probe that stops for
        another reason (cancelled, lost) frees its claim at once, not after probe_ttl_s."""
        d = t.deployment
        try:
            with self._in_flight(d):
                return await stream_attempt(self._provider, d, t.body, t.api_key, req.budget_s(), req.state,
                                            req.on_start, req.on_chunk, req.forward_usage_chunk, gate)
        except UpstreamError as exc:
            return exc
        except BaseException:
            if t.probe:
                await asyncio.shield(self.learner.release_probe(d))
            raise

    @contextlib.contextmanager
    def _in_flight(self, d: Deployment) -> Iterator[None]:
        """Count an attempt on `d` as in flight in this worker while it runs (spreading reads it)."""
        self.inflight[d.key] += 1
        try:
            yield
        finally:
            self.inflight[d.key] -= 1
            if self.inflight[d.key] <= 0:
                del self.inflight[d.key]

    async def _release(self, t: _Try) -> None:
        if t.probe:
            await self.learner.release_probe(t.deployment)

    @staticmethod
    def _hedged(race: _Race, req: _Request, outcome: str) -> None:
        d = race.primary.deployment
        req.state.hedges.append((d.key, d.provider.id, outcome))
        log.info("hedge of %s: %s", d.key, outcome)

    async def _failed(self, t: _Try, exc: UpstreamError, req: _Request, decide: bool = True) -> _Try | None:
        """Learn from one failed attempt; the same candidate again (retry) or None (the next one)."""
        state, d = req.state, t.deployment
        outcome = classify(exc, self._tuning)
        state.attempts.append(AttemptLog(d.key, d.provider.id, exc.reason, exc.status, exc.message))
        state.notes.append((d.key, f"failed:{exc.reason}"))
        log.info("attempt on %s failed: %s", d.key, outcome.value)
        req.last = exc
        rule = POLICY[outcome]
        refused = capabilities.learned_feature(getattr(exc, "feature", None), tuple(req.needs))
        # An embeddings field is never dropped: without it the vectors would not be what was asked.
        if refused is not None and not req.embeddings and refused in t.body and droppable(refused, t.body[refused]):
            # A field its profile did not know it refuses, and one it may go without: never sent to
            # it again (by any worker), and this request asks once more without it.
            await self.learner.mark_unsupported(d, refused, req.health)
            t.body = self._prepare(d, req)
            return t if decide else None
        if isinstance(exc, UpstreamTimeout) and self._local.overwhelmed:
            # This worker's own event loop was late: the clock ran out here, maybe not there.
            # Nothing is held against the deployment (its breaker, its latency); the request
            # still moves on as it would after any timeout.
            state.notes[-1] = (d.key, f"failed:{exc.reason}:local")
            if t.probe:
                await self.learner.release_probe(d)
        else:
            await self.learner.learn(d, t.api_key, rule.health, outcome, exc, t.probe, req.health, req.ranked)
        if rule.health == "unsupported" and refused is not None and refused not in _UNLEARNED:
            await self.learner.mark_unsupported(d, refused, req.health)
        await self._learn_window(d, exc, req)
        if not decide:
            return None
        if req.visible and state.chunks_sent > 0:
            return None  # the caller holds part of an answer: continue elsewhere, never retry here
        if rule.then == "return":
            raise exc
        if t.probe or t.retries >= rule.same_deployment_retries:
            return None
        t.retries += 1
        wait_s = retry_wait_s(outcome, exc, t.retries, self._tuning)
        if wait_s > req.budget_s() - _MIN_ATTEMPT_BUDGET_S:
            return None  # waiting would eat the deadline: fail over instead
        await self._sleep(wait_s)
        req.health.at_ms = now_ms()  # a park this wait was for has lapsed by now
        return t

    async def _learn_window(self, d: Deployment, exc: UpstreamError, req: _Request) -> None:
        """After a context refusal, only candidates whose window holds what it said this request
        needs are tried; a window it stated is routed by from now on (every worker)."""
        too_long = isinstance(exc, ContextTooLong)
        capped = isinstance(exc, NotServable) and exc.feature == "tokens"
        if not isinstance(exc, ContextTooLong | NotServable) or not (too_long or capped):
            return
        limit, requested = exc.limit_tokens, exc.requested_tokens
        if limit:
            await self.learner.learn_window(d, limit, req.health)
            req.min_tokens = max(req.min_tokens, requested if requested and requested > limit else limit + 1)
        elif too_long:  # no limit stated: a larger window than this one's, at least
            req.min_tokens = max(req.min_tokens, window(d, req.health) + 1)


async def _no_start(_: Deployment, __: int) -> None:
    return None


async def _no_chunk(_: dict[str, Any]) -> None:
    return None


async def _joined(task: "asyncio.Task[Any]") -> None:
    """Wait for a hedge's task to end; if this request is cancelled meanwhile (its caller left),
    the hedge is cancelled too instead of streaming on for nobody."""
    try:
        await asyncio.wait([task])
    except asyncio.CancelledError:
        task.cancel()
        raise
