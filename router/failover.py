"""Try ranked deployments, following the policy table for each failure (DESIGN.md §5).

Before the first chunk reaches the caller a failure is invisible: retry or fail over. After it,
the answer continues on a deployment that supports an assistant prefix (prefill), or the
failure is reported in-band. Non-streaming requests stream upstream as well and assemble the
answer, so a cut is retried from scratch and a truncated completion is never returned.
"""

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError

from router.assemble import CompletionAssembler
from router.attempt import AttemptLog, OnChunk, OnStart, RunState, stream_attempt
from router.catalog import Deployment
from router.errors import NotServable, RateLimited, UpstreamError
from router.health import HealthSnapshot, HealthStore, KeyState, key_fingerprint, now_ms, quota_scope
from router.keys import KeyRotation, NoUsableKey
from router.policy import POLICY, Outcome, Tuning, classify, park_s, retry_wait_s
from router.providers import limits
from router.providers.openai_compat import OpenAICompatProvider
from router.providers.profile import droppable, request_needs
from router.select import NoneAvailable
from settings.logfields import STORE_DOWN

__all__ = ["AllFailed", "AttemptLog", "FailoverExecutor", "MidStreamFailure", "RunState"]

log = logging.getLogger("freeference.failover")

# A model that answered 404 stays out of rotation this long (the catalog refresh may end it sooner).
MODEL_GONE_COOLDOWN_S = 300.0
# Retry-After for a request whose candidates were all being probed by other workers.
_BUSY_RETRY_AFTER_S = 1.0
# A retry wait must leave at least this much of the request's budget for the retry itself.
_MIN_ATTEMPT_BUDGET_S = 0.5
# A deployment that said it cannot serve a feature (tools, a field) is skipped for requests that
# need it this long, in this worker, before it is asked again (providers add features).
UNSUPPORTED_MEMORY_S = 3600.0
# Features learned per request rather than per deployment: a per-request size cap says nothing
# about the next request.
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


class FailoverExecutor:
    def __init__(self, provider: OpenAICompatProvider, rotation: KeyRotation, health: HealthStore | None,
                 tuning: Tuning, sleep: Sleep = asyncio.sleep) -> None:
        self._provider = provider
        self._rotation = rotation
        self._health = health
        self._tuning = tuning
        self._sleep = sleep
        self._bookkeeping: set[asyncio.Task[None]] = set()
        # (deployment key, feature) → monotonic time until which that deployment is not asked
        # for requests needing that feature (class b answers, DESIGN.md §5).
        self._unsupported: dict[tuple[str, str], float] = {}
        # deployment key → fields it refused that a request may go without: dropped for it
        # from then on, as if its profile listed them (this worker's lifetime).
        self._refused_fields: dict[str, frozenset[str]] = {}

    async def snapshot(self, deployments: Sequence[Deployment]) -> HealthSnapshot:
        """Shared health of the candidates; an empty snapshot when Redis cannot tell."""
        if self._health is None:
            return HealthSnapshot(at_ms=0)
        try:
            return await self._health.snapshot(deployments)
        except (RedisError, OSError) as exc:
            log.warning("health unavailable (%s): routing without it", type(exc).__name__, extra=STORE_DOWN)
            return HealthSnapshot(at_ms=0)

    async def complete(self, ranked: Sequence[Deployment], body: dict[str, Any], state: RunState,
                       health: HealthSnapshot, budget_s: Callable[[], float]) -> tuple[dict[str, Any], Deployment]:
        """Non-streaming: a whole chat.completion from the first deployment that finishes one."""
        assembler = CompletionAssembler()

        async def on_start(_: Deployment, __: int) -> None:
            return None

        served = await self._run(ranked, body, state, health, budget_s, on_start, assembler.add,
                                 forward_usage_chunk=True, visible=False, restart=assembler.reset)
        return assembler.result(served.model.id), served

    async def stream(self, ranked: Sequence[Deployment], body: dict[str, Any], state: RunState,
                     health: HealthSnapshot, budget_s: Callable[[], float], on_start: OnStart, on_chunk: OnChunk,
                     forward_usage_chunk: bool) -> Deployment:
        """Streaming: invisible failover before the first chunk, continuation (prefill) after."""
        return await self._run(ranked, body, state, health, budget_s, on_start, on_chunk,
                               forward_usage_chunk=forward_usage_chunk, visible=True, restart=None)

    async def _run(self, ranked: Sequence[Deployment], body: dict[str, Any], state: RunState,
                   health: HealthSnapshot, budget_s: Callable[[], float], on_start: OnStart, on_chunk: OnChunk,
                   *, forward_usage_chunk: bool, visible: bool, restart: Callable[[], None] | None) -> Deployment:
        last: UpstreamError | None = None
        min_context = 0
        needs = request_needs(body) if self._unsupported else frozenset()
        for deployment in ranked:
            midstream = visible and state.chunks_sent > 0
            if deployment.model.context_window <= min_context:
                continue
            if midstream and not (state.continuable and deployment.model.supports_prefill):
                continue
            try:
                prepared = self._prepare(deployment, body, needs)
            except NotServable as exc:  # known before any call: skipped, nothing to learn
                state.skipped.append(AttemptLog(deployment.key, deployment.provider.id, exc.reason, None,
                                                exc.message))
                continue
            probe = health.of(deployment).state(health.at_ms) == "half_open"
            if probe and not await self._claim_probe(deployment):
                continue  # another worker is probing this breaker right now
            retries = 0
            try:
                while True:
                    try:
                        api_key = self._rotation.pick(deployment, health)
                    except NoUsableKey:
                        if probe:
                            await self._release_probe(deployment)  # let a worker with a key probe it
                        break
                    if restart is not None:
                        restart()
                        state.forget_output()
                    try:
                        result = await stream_attempt(self._provider, deployment, prepared, api_key, budget_s(),
                                                      state, on_start, on_chunk, forward_usage_chunk)
                    except UpstreamError as exc:
                        outcome = classify(exc, self._tuning)
                        self._record(state, deployment, exc, outcome)
                        last = exc
                        if self._learn_field_drop(deployment, exc, prepared):
                            # A field its profile did not know it refuses, and one it may go without:
                            # never sent to it again, and this request asks once more without it.
                            prepared = self._prepare(deployment, body, needs)
                            continue
                        await self._learn(deployment, api_key, outcome, exc, probe, health, ranked)
                        rule = POLICY[outcome]
                        if visible and state.chunks_sent > 0:
                            break  # the caller holds part of an answer: continue elsewhere, never retry here
                        if rule.then == "return":
                            raise
                        if rule.then == "failover_larger_context":
                            min_context = max(min_context, deployment.model.context_window)
                        if probe or retries >= rule.same_deployment_retries:
                            break
                        retries += 1
                        wait_s = retry_wait_s(outcome, exc, retries, self._tuning)
                        if wait_s > budget_s() - _MIN_ATTEMPT_BUDGET_S:
                            break  # waiting would eat the deadline: fail over instead
                        await self._sleep(wait_s)
                        health.at_ms = now_ms()  # a park this wait was for has lapsed by now
                        continue
                    # Recording success must not delay the answer: the caller's done event goes first.
                    self._in_background(self._succeeded(deployment, api_key, result.first_chunk_ms, result.headers,
                                                        health))
                    return deployment
            except UpstreamError:
                raise  # its outcome is recorded (_learn), which settles a probe
            except BaseException:
                # Cancelled (the caller left) or stopped for a reason that says nothing about the
                # route: free a half-open breaker's probe now, not after probe_ttl_s.
                if probe:
                    await asyncio.shield(self._release_probe(deployment))
                raise
        if last is None:
            if state.skipped and len(state.skipped) == len(ranked):
                # Every candidate lacks something this request needs: no upstream call can help.
                raise AllFailed(NotServable(state.skipped[-1].message))
            # Nothing was tried: every candidate was being probed by another worker or had no
            # usable key left. That is "unavailable right now", not an upstream failure.
            raise NoneAvailable(_BUSY_RETRY_AFTER_S)
        if visible and state.chunks_sent > 0:
            raise MidStreamFailure(last)
        raise AllFailed(last)

    def _prepare(self, deployment: Deployment, body: dict[str, Any], needs: frozenset[str]) -> dict[str, Any]:
        """The body for this deployment (its profile applied), or NotServable before any call."""
        if needs:
            now = time.monotonic()
            for feature in needs:
                until = self._unsupported.get((deployment.key, feature))
                if until is not None and until > now:
                    raise NotServable(f"{deployment.key} answered earlier that it does not support {feature}",
                                      feature=feature)
        prepared = self._provider.prepare(deployment, body)
        refused = self._refused_fields.get(deployment.key)
        if refused and refused & prepared.keys():
            prepared = {k: v for k, v in prepared.items() if k not in refused}
        return prepared

    def _learn_field_drop(self, deployment: Deployment, exc: UpstreamError, sent: dict[str, Any]) -> bool:
        """True when `exc` refused a top-level field this request may go without (now dropped for it)."""
        field = exc.feature if isinstance(exc, NotServable) else None
        if not field or field not in sent or not droppable(field, sent[field]):
            return False
        known = self._refused_fields.get(deployment.key, frozenset())
        if field in known:
            return False
        self._refused_fields[deployment.key] = known | {field}
        log.warning("%s refused the field %r: it is no longer sent there", deployment.key, field)
        return True

    def _remember_unsupported(self, deployment: Deployment, exc: UpstreamError) -> None:
        feature = getattr(exc, "feature", None)
        if feature and feature not in _UNLEARNED:
            self._unsupported[(deployment.key, feature)] = time.monotonic() + UNSUPPORTED_MEMORY_S
            if len(self._unsupported) > 10_000:  # bounded: drop what has lapsed
                now = time.monotonic()
                self._unsupported = {k: v for k, v in self._unsupported.items() if v > now}

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._bookkeeping.add(task)  # a reference, so the task is not garbage-collected mid-flight
        task.add_done_callback(self._bookkeeping.discard)

    async def settle(self) -> None:
        """Wait for background health writes (tests, shutdown)."""
        while self._bookkeeping:
            await asyncio.gather(*self._bookkeeping)

    async def _claim_probe(self, deployment: Deployment) -> bool:
        if self._health is None:
            return True
        try:
            return await self._health.claim_probe(deployment)
        except (RedisError, OSError):
            return False

    async def _release_probe(self, deployment: Deployment) -> None:
        if self._health is None:
            return
        try:
            await self._health.release_probe(deployment)
        except (RedisError, OSError) as exc:
            log.warning("could not release the probe of %s: %s", deployment.key, type(exc).__name__,
                        extra=STORE_DOWN)

    async def _succeeded(self, deployment: Deployment, api_key: str | None, first_chunk_ms: float | None,
                         headers: Mapping[str, str] | None, health: HealthSnapshot) -> None:
        if self._health is None:
            return
        reading = limits.read(headers, deployment.provider.config.profile.limits.headers) if headers else None
        quota = reading if reading is not None and not reading.empty else None
        try:
            await self._health.record_success(deployment, first_chunk_ms, quota, api_key)
            if quota is not None and quota.wait_s and api_key is not None:
                # The answer used up its key's quota: if no other key may serve this model, it
                # cools as long as the soonest of them is out (as a quota failure would).
                others = [health.key(deployment.provider.id, k).blocked_until_ms(deployment.model.upstream_name)
                          for k in deployment.provider.api_keys if k != api_key]
                back_ms = min([now_ms() + int(quota.wait_s * 1000), *others])
                if back_ms > now_ms():
                    await self._health.cool(deployment, (back_ms - now_ms()) / 1000)
        except (RedisError, OSError) as exc:
            log.warning("could not record health of %s: %s", deployment.key, type(exc).__name__, extra=STORE_DOWN)

    async def _learn(self, deployment: Deployment, api_key: str | None, outcome: Outcome, exc: UpstreamError,
                     probe: bool, health: HealthSnapshot, ranked: Sequence[Deployment] = ()) -> None:
        """Tell the shared health what this failure means (policy column 'health')."""
        if self._health is None:
            return
        effect = POLICY[outcome].health
        if effect == "unsupported":
            self._remember_unsupported(deployment, exc)
        try:
            if effect == "failure":
                if await self._health.record_failure(deployment, probe=probe):
                    log.warning("circuit breaker opened for %s", deployment.key)
            elif effect == "park":
                await self._park(deployment, api_key, outcome, exc, health, ranked)
            elif effect == "gone":
                await self._health.cool(deployment, MODEL_GONE_COOLDOWN_S)
            elif effect == "ban_key" and api_key is not None:
                await self._health.ban_key(deployment, api_key)
                # This request must not pick the same key again either.
                health.keys[(deployment.provider.id, key_fingerprint(api_key))] = KeyState(
                    banned_until_ms=now_ms() + int(self._health.tuning.key_ban_s * 1000))
                log.warning("an upstream key of %s was refused (%s): out of rotation", deployment.provider.id,
                            exc.status)
            elif effect in ("none", "unsupported") and probe:
                # The probe got an answer about the request itself: the route is alive.
                await self._health.record_success(deployment, None, None, None)
        except (RedisError, OSError) as err:
            log.warning("could not record health of %s: %s", deployment.key, type(err).__name__, extra=STORE_DOWN)
        if probe and (effect == "ban_key" or (effect == "park" and api_key is not None)):
            # The answer was about our key's quota, not the route: a worker with another key may probe now.
            await self._release_probe(deployment)

    async def _park(self, deployment: Deployment, api_key: str | None, outcome: Outcome, exc: UpstreamError,
                    health: HealthSnapshot, ranked: Sequence[Deployment]) -> None:
        """Take the key's quota out at the scope it applies to, for exactly the wait stated.

        A deployment left with no key that may serve it also cools until its first key is back,
        so that what reads deployment health alone (the API's /v1/models/random) sees it out too.
        """
        assert self._health is not None
        scope = (exc.scope if isinstance(exc, RateLimited) else None) or quota_scope(deployment)
        seconds = park_s(outcome, exc, self._tuning)
        until_ms = await self._health.park(deployment, api_key, scope, seconds)
        if api_key is None:
            return
        # This request must not pick the same key for the same quota either.
        key_id = (deployment.provider.id, key_fingerprint(api_key))
        current = health.keys.get(key_id) or KeyState()
        if scope == "model":
            models = {**current.models, deployment.model.upstream_name: until_ms}
            health.keys[key_id] = dataclasses.replace(current, models=models)
        else:
            health.keys[key_id] = dataclasses.replace(current, exhausted_until_ms=until_ms)
        affected = [deployment] if scope == "model" else \
            [deployment, *(d for d in ranked if d.provider.id == deployment.provider.id and d.key != deployment.key)]
        for d in affected:
            if not health.usable_keys(d):
                back_ms = min(health.key(d.provider.id, k).blocked_until_ms(d.model.upstream_name)
                              for k in d.provider.api_keys)
                await self._health.cool(d, max(back_ms - now_ms(), 0) / 1000)
        if outcome is Outcome.QUOTA_EXHAUSTED:
            log.warning("quota of a %s key (%s scope) is exhausted for %.0f s: parked, not retried before then",
                        deployment.provider.id, scope, seconds)

    @staticmethod
    def _record(state: RunState, deployment: Deployment, exc: UpstreamError, outcome: Outcome) -> None:
        state.attempts.append(AttemptLog(deployment.key, deployment.provider.id, exc.reason, exc.status,
                                         exc.message))
        log.info("attempt on %s failed: %s", deployment.key, outcome.value)
