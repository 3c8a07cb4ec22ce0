"""What the shared health learns from each attempt (the policy table's "health" column).

Every write goes to Redis for all workers and, where the same request decides on it again (a
key parked, a feature marked, a window learned), into the request's own snapshot too. A Redis
that cannot be written is logged and routed around: learning never fails a request.
"""

import asyncio
import dataclasses
import logging
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError

from router.catalog import Deployment
from router.errors import RateLimited, UpstreamError
from router.health import HealthSnapshot, HealthStore, KeyState, key_fingerprint, now_ms, quota_scope
from router.policy import Outcome, Tuning, park_s
from router.providers import limits
from settings.logfields import STORE_DOWN

log = logging.getLogger("freeference.failover")

# A model that answered 404 stays out of rotation this long (the catalog refresh may end it sooner).
MODEL_GONE_COOLDOWN_S = 300.0
# Feature and field names longer than this are not remembered (real ones are short).
_MAX_MARK_CHARS = 64


class HealthLearner:
    """Reads and teaches the shared health on behalf of one worker's executor."""

    def __init__(self, store: HealthStore | None, tuning: Tuning) -> None:
        self.store = store
        self._tuning = tuning
        self._bookkeeping: set[asyncio.Task[None]] = set()

    async def snapshot(self, deployments: Sequence[Deployment]) -> HealthSnapshot:
        """Shared health of the candidates; an empty snapshot when Redis cannot tell."""
        if self.store is None:
            return HealthSnapshot(at_ms=0)
        try:
            return await self.store.snapshot(deployments)
        except (RedisError, OSError) as exc:
            log.warning("health unavailable (%s): routing without it", type(exc).__name__, extra=STORE_DOWN)
            return HealthSnapshot(at_ms=0)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a write without holding up the answer (settle() waits for them)."""
        task = asyncio.get_running_loop().create_task(work)
        self._bookkeeping.add(task)  # a reference, so the task is not garbage-collected mid-flight
        task.add_done_callback(self._bookkeeping.discard)

    async def settle(self) -> None:
        """Wait for background health writes (tests, shutdown)."""
        while self._bookkeeping:
            await asyncio.gather(*self._bookkeeping)

    async def claim_probe(self, deployment: Deployment) -> bool:
        """Become the one worker that probes a half-open breaker (False: another one is)."""
        if self.store is None:
            return True
        try:
            return await self.store.claim_probe(deployment)
        except (RedisError, OSError):
            return False

    async def release_probe(self, deployment: Deployment) -> None:
        """Give up a probe claim, so the next request may probe at once."""
        if self.store is None:
            return
        try:
            await self.store.release_probe(deployment)
        except (RedisError, OSError) as exc:
            log.warning("could not release the probe of %s: %s", deployment.key, type(exc).__name__,
                        extra=STORE_DOWN)

    async def probe_answered(self, deployment: Deployment, first_token_ms: float | None) -> None:
        """A probe's first token arrived: the route is back, close its breaker for everyone now
        (not only once the whole answer is in, which may take minutes)."""
        await self._guarded(deployment, self._close(deployment, first_token_ms))

    async def _close(self, deployment: Deployment, first_token_ms: float | None) -> None:
        assert self.store is not None
        await self.store.record_success(deployment, first_token_ms, None, None)
        log.info("circuit breaker of %s closed: its probe got a first token", deployment.key)

    async def succeeded(self, deployment: Deployment, api_key: str | None, first_chunk_ms: float | None,
                        headers: Mapping[str, str] | None, health: HealthSnapshot) -> None:
        """Close the breaker, fold in the latency, store the quota the answer reported."""
        if self.store is None:
            return
        reading = limits.read(headers, deployment.provider.config.profile.limits.headers) if headers else None
        quota = reading if reading is not None and not reading.empty else None
        try:
            await self.store.record_success(deployment, first_chunk_ms, quota, api_key)
            if quota is not None and quota.wait_s and api_key is not None:
                # The answer used up its key's quota: if no other key may serve this model, it
                # cools as long as the soonest of them is out (as a quota failure would).
                others = [health.key(deployment.provider.id, k).blocked_until_ms(deployment.model.upstream_name)
                          for k in deployment.provider.api_keys if k != api_key]
                back_ms = min([now_ms() + int(quota.wait_s * 1000), *others])
                if back_ms > now_ms():
                    await self.store.cool(deployment, (back_ms - now_ms()) / 1000)
        except (RedisError, OSError) as exc:
            log.warning("could not record health of %s: %s", deployment.key, type(exc).__name__, extra=STORE_DOWN)

    async def mark_unsupported(self, deployment: Deployment, feature: str, health: HealthSnapshot) -> None:
        """Every worker keeps requests needing `feature` off this deployment for a while (not cooled)."""
        if len(feature) > _MAX_MARK_CHARS:
            return
        until_ms = now_ms() + int((self.store.tuning.feature_mark_s if self.store else 3600.0) * 1000)
        current = health.of(deployment)
        health.deployments[deployment.key] = current.model_copy(
            update={"unsupported": {**current.unsupported, feature: until_ms}})
        if self.store is not None:
            await self._guarded(deployment, self.store.mark_unsupported(deployment, feature))
        log.info("%s does not support %s: kept from requests that need it", deployment.key, feature)

    async def learn_window(self, deployment: Deployment, tokens: int, health: HealthSnapshot) -> None:
        """Route by a smaller context window the provider stated, from this request on."""
        current = health.of(deployment)
        if not 0 < tokens < current.window(deployment.model.context_window, health.at_ms):
            return
        until_ms = now_ms() + int((self.store.tuning.learned_window_s if self.store else 86_400.0) * 1000)
        health.deployments[deployment.key] = current.model_copy(
            update={"window_tokens": tokens, "window_until_ms": until_ms})
        if self.store is not None:
            await self._guarded(deployment, self.store.learn_window(deployment, tokens))
        log.info("%s states a %d-token window (catalog: %d): routed by it", deployment.key, tokens,
                 deployment.model.context_window)

    async def learn(self, deployment: Deployment, api_key: str | None, effect: str, outcome: Outcome,
                    exc: UpstreamError, probe: bool, health: HealthSnapshot, ranked: Sequence[Deployment]) -> None:
        """Tell the shared health what this failure means (policy column 'health')."""
        if self.store is None:
            return
        store = self.store
        try:
            if effect == "failure":
                if await store.record_failure(deployment, probe=probe):
                    log.warning("circuit breaker opened for %s", deployment.key)
            elif effect == "park":
                await self._park(deployment, api_key, outcome, exc, health, ranked)
            elif effect == "gone":
                await store.cool(deployment, MODEL_GONE_COOLDOWN_S)
            elif effect == "ban_key" and api_key is not None:
                await store.ban_key(deployment, api_key)
                # This request must not pick the same key again either.
                health.keys[(deployment.provider.id, key_fingerprint(api_key))] = KeyState(
                    banned_until_ms=now_ms() + int(store.tuning.key_ban_s * 1000))
                log.warning("an upstream key of %s was refused (%s): out of rotation", deployment.provider.id,
                            exc.status)
            elif effect in ("none", "unsupported") and probe:
                # The probe got an answer about the request itself: the route is alive.
                await store.record_success(deployment, None, None, None)
        except (RedisError, OSError) as err:
            log.warning("could not record health of %s: %s", deployment.key, type(err).__name__, extra=STORE_DOWN)
        if probe and (effect == "ban_key" or (effect == "park" and api_key is not None)):
            # The answer was about our key's quota, not the route: a worker with another key may probe now.
            await self.release_probe(deployment)

    async def _park(self, deployment: Deployment, api_key: str | None, outcome: Outcome, exc: UpstreamError,
                    health: HealthSnapshot, ranked: Sequence[Deployment]) -> None:
        """Take the key's quota out at the scope it applies to, for exactly the wait stated.

        A deployment left with no key that may serve it also cools until its first key is back,
        so that what reads deployment health alone (the API's /v1/models/random) sees it out too.
        """
        assert self.store is not None
        scope = (exc.scope if isinstance(exc, RateLimited) else None) or quota_scope(deployment)
        seconds = park_s(outcome, exc, self._tuning)
        until_ms = await self.store.park(deployment, api_key, scope, seconds)
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
                await self.store.cool(d, max(back_ms - now_ms(), 0) / 1000)
        if outcome is Outcome.QUOTA_EXHAUSTED:
            log.warning("quota of a %s key (%s scope) is exhausted for %.0f s: parked, not retried before then",
                        deployment.provider.id, scope, seconds)

    async def _guarded(self, deployment: Deployment, write: Coroutine[Any, Any, Any]) -> None:
        if self.store is None:
            write.close()
            return
        try:
            await write
        except (RedisError, OSError) as exc:
            log.warning("could not record health of %s: %s", deployment.key, type(exc).__name__, extra=STORE_DOWN)
