"""Shared deployment health in Redis: circuit breakers, cooling, latency EWMA, upstream key state.

Every worker reads and writes the same hashes (names in router/keyspace.py), so a breaker
opened by one worker keeps all of them off that route. The hot path costs one pipelined read
per request (all candidates and their keys) and one pipelined write after the answer.
"""

import asyncio
import functools
import hashlib
import random
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis

from router import health_scripts as scripts
from router.catalog import Deployment
from router.keyspace import (
    MODEL_PARK_PREFIX,
    MODEL_QUOTA_PREFIX,
    UNSUPPORTED_PREFIX,
    DeploymentHealth,
    deployment_health_key,
    deployment_probe_key,
    upstream_key_state_key,
)
from router.providers.limits import QuotaReading

# Health hashes outlive any cooldown by far; the TTL only collects deployments that were removed.
_HEALTH_TTL_MS = 7 * 24 * 3600 * 1000
# A breaker stays open for 80-100 % of its cooldown (never longer: the cap is a promise).
_COOLDOWN_JITTER = 0.2
# Live feature marks one deployment may carry (real providers refuse a handful of features).
_MAX_MARKS = 32
# The health of a deployment nobody has written anything about yet (frozen, so it may be shared).
_FRESH = DeploymentHealth()

def now_ms() -> int:
    """Wall-clock milliseconds (shared across processes and machines)."""
    return int(time.time() * 1000)


@functools.lru_cache(maxsize=4096)
def key_fingerprint(api_key: str) -> str:
    """A stable, non-reversible name for an upstream key (the key itself is never stored).

    Cached: every claim and every key pick names all the catalog's keys, and the keys are the
    catalog's, held by the process anyway.
    """
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class KeyState:
    """Quota and ban state of one upstream key (and of its per-model quotas)."""

    banned_until_ms: int = 0
    exhausted_until_ms: int = 0  # the key's (or its account's) quota is out until then
    remaining_requests: int | None = None
    limit_requests: int | None = None
    # upstream model → the key's quota for that model is out until then (providers whose
    # limits apply per model: Groq, Gemini, Cerebras, Mistral, GitHub Models).
    models: Mapping[str, int] = field(default_factory=dict)
    # upstream model → (remaining, limit) requests the last answer for that model reported, for
    # those providers: each model has its own headroom there.
    model_quota: Mapping[str, tuple[int, int | None]] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes]) -> "KeyState":
        """Parse HGETALL output (one pass: every claim parses every key of every candidate)."""
        numbers: dict[str, int] = {}
        models: dict[str, int] = {}
        quota: dict[str, tuple[int, int | None]] = {}
        for key, value in raw.items():
            name, text = key.decode(), value.decode()
            if name.startswith(MODEL_PARK_PREFIX):
                models[name[len(MODEL_PARK_PREFIX):]] = int(float(text))
            elif name.startswith(MODEL_QUOTA_PREFIX):
                if (parsed := _remaining_limit(text)) is not None:
                    quota[name[len(MODEL_QUOTA_PREFIX):]] = parsed
            elif text:
                numbers[name] = int(float(text))
        return cls(numbers.get("banned_until_ms", 0), numbers.get("exhausted_until_ms", 0),
                   numbers.get("remaining_requests"), numbers.get("limit_requests"), models, quota)

    def blocked_until_ms(self, model: str | None = None) -> int:
        """When this key may serve `model` again (the past: now)."""
        return max(self.banned_until_ms, self.exhausted_until_ms, self.models.get(model, 0) if model else 0)

    def usable(self, at_ms: int, model: str | None = None) -> bool:
        """Neither banned (401/403) nor out of quota (for `model`, if given) at `at_ms`."""
        return self.blocked_until_ms(model) <= at_ms

    def headroom(self, model: str | None = None) -> float:
        """Fraction of the request quota left, for `model` where it has its own (1.0 when nobody said)."""
        remaining, limit = self.model_quota.get(model, (self.remaining_requests, self.limit_requests)) \
            if model else (self.remaining_requests, self.limit_requests)
        if remaining is None:
            return 1.0
        if limit:
            return max(min(remaining / limit, 1.0), 0.0)
        return 1.0 if remaining > 0 else 0.0


def _remaining_limit(value: str) -> tuple[int, int | None] | None:
    """A MODEL_QUOTA_PREFIX field: "<remaining>/<limit>" (the limit may be empty)."""
    remaining, _, limit = value.partition("/")
    try:
        return int(remaining), int(limit) if limit else None
    except ValueError:
        return None


@dataclass
class HealthSnapshot:
    """Health of a set of deployments and their keys, read in one round trip."""

    at_ms: int
    deployments: dict[str, DeploymentHealth] = field(default_factory=dict)
    keys: dict[tuple[str, str], KeyState] = field(default_factory=dict)

    def of(self, deployment: Deployment) -> DeploymentHealth:
        """The deployment's health (a fresh, closed breaker if never seen)."""
        return self.deployments.get(deployment.key) or _FRESH

    def key(self, provider: str, api_key: str) -> KeyState:
        """One upstream key's state."""
        return self.keys.get((provider, key_fingerprint(api_key))) or KeyState()

    def usable_keys(self, deployment: Deployment) -> list[str]:
        """The provider's keys that are neither banned nor out of quota for this model right now."""
        provider, model = deployment.provider.id, deployment.model.upstream_name
        return [k for k in deployment.provider.api_keys if self.key(provider, k).usable(self.at_ms, model)]

    def headroom(self, deployment: Deployment) -> float:
        """Best quota headroom over the deployment's usable keys (1.0 for keyless providers)."""
        keys = self.usable_keys(deployment)
        if not deployment.provider.api_keys:
            return 1.0
        model = deployment.model.upstream_name
        return max((self.key(deployment.provider.id, k).headroom(model) for k in keys), default=0.0)


@dataclass(frozen=True)
class BreakerTuning:
    failure_threshold: int = 3
    cooldown_s: float = 5.0
    max_cooldown_s: float = 8.0
    probe_ttl_s: float = 30.0
    ewma_alpha: float = 0.3
    key_ban_s: float = 3600.0
    feature_mark_s: float = 3600.0
    learned_window_s: float = 86_400.0


class CommandSink(Protocol):
    """Sends a command with other writes already on their way (the worker's event publisher)."""

    def submit_command(self, *command: str | bytes) -> Awaitable[Any]: ...


class HealthStore:
    """Reads and writes the shared health hashes.

    With a `sink`, a success (the write after nearly every request) goes out with the job's
    own events in one write instead of a round trip of its own.
    """

    def __init__(self, redis: Redis, tuning: BreakerTuning, sink: CommandSink | None = None) -> None:
        self._redis = redis
        self.tuning = tuning
        self._sink = sink
        self._failure = redis.register_script(scripts.RECORD_FAILURE)
        self._park = redis.register_script(scripts.PARK)
        self._mark = redis.register_script(scripts.MARK)

    async def snapshot(self, deployments: Iterable[Deployment]) -> HealthSnapshot:
        """Health of every deployment and every key of their providers: one pipelined round trip."""
        deployments = list(deployments)
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in snapshot_keys(deployments):
                pipe.hgetall(key)
            results = await pipe.execute()
        return snapshot_from(deployments, results, now_ms())

    async def claim_probe(self, deployment: Deployment) -> bool:
        """Atomically become the one worker that probes a half-open breaker."""
        claimed = await self._redis.set(deployment_probe_key(deployment.key), b"1", nx=True,
                                        px=int(self.tuning.probe_ttl_s * 1000))
        return bool(claimed)

    async def release_probe(self, deployment: Deployment) -> None:
        """Give up a probe claim without trying (the claim would otherwise last probe_ttl_s)."""
        await self._redis.delete(deployment_probe_key(deployment.key))

    async def record_success(self, deployment: Deployment, latency_ms: float | None,
                             quota: QuotaReading | None, api_key: str | None) -> None:
        """Close the breaker, fold the latency into the EWMA, store quota headers: one round trip."""
        keys = [deployment_health_key(deployment.key), deployment_probe_key(deployment.key)]
        args = [str(latency_ms if latency_ms is not None else -1), str(self.tuning.ewma_alpha), str(_HEALTH_TTL_MS)]
        # EVAL, not a Script object: redis-py checks a pipeline's scripts with SCRIPT EXISTS
        # first, which would be a second round trip on every success.
        commands: list[tuple[str, ...]] = [("EVAL", scripts.RECORD_SUCCESS, str(len(keys)), *keys, *args)]
        if quota is not None and api_key:
            key_state = upstream_key_state_key(deployment.provider.id, key_fingerprint(api_key))
            scope = quota_scope(deployment)
            fields = [(name, str(value)) for name, value in (("remaining_requests", quota.remaining_requests),
                                                             ("limit_requests", quota.limit_requests))
                      if value is not None]
            if scope == "model" and quota.remaining_requests is not None:
                # Each model has its own quota there: its headroom is its own (spreading reads it).
                fields = [(f"{MODEL_QUOTA_PREFIX}{deployment.model.upstream_name}",
                           f"{quota.remaining_requests}/{quota.limit_requests or ''}")]
            if fields:
                commands.append(("HSET", key_state, *(part for pair in fields for part in pair)))
            field_name = park_field(deployment, scope)
            if quota.wait_s:  # an answer that used up the last of a limit: park before the next call
                until = str(now_ms() + int(quota.wait_s * 1000))
                commands.append(("EVAL", scripts.PARK, "1", key_state, field_name, until, str(_HEALTH_TTL_MS)))
            elif quota.remaining_requests:  # the provider says there is quota again: a park is over
                commands.append(("HSET", key_state, field_name, "0"))
            commands.append(("PEXPIRE", key_state, str(_HEALTH_TTL_MS)))
        if self._sink is not None:
            sink = self._sink
            await asyncio.gather(*(sink.submit_command(*command) for command in commands))
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()

    async def record_failure(self, deployment: Deployment, probe: bool = True) -> bool:
        """Count a failure; True when this failure opened (or, being the probe, reopened) the breaker."""
        t = self.tuning
        keys = [deployment_health_key(deployment.key), deployment_probe_key(deployment.key)]
        jitter = 1.0 - random.uniform(0, _COOLDOWN_JITTER)
        _fails, opened, _cooldown = await self._failure(
            keys=keys, args=[now_ms(), t.failure_threshold, int(t.cooldown_s * 1000),
                             int(t.max_cooldown_s * 1000), _HEALTH_TTL_MS, int(probe), f"{jitter:.4f}"])
        return bool(opened)

    async def mark_unsupported(self, deployment: Deployment, feature: str) -> bool:
        """Keep every worker's requests needing `feature` off this deployment for feature_mark_s."""
        until_ms = now_ms() + int(self.tuning.feature_mark_s * 1000)
        written = await self._mark(keys=[deployment_health_key(deployment.key)],
                                   args=[now_ms(), f"{UNSUPPORTED_PREFIX}{feature}", until_ms, _HEALTH_TTL_MS,
                                         _MAX_MARKS, UNSUPPORTED_PREFIX])
        return bool(written)

    async def learn_window(self, deployment: Deployment, tokens: int) -> None:
        """Route by a context window the provider stated for this deployment, for learned_window_s."""
        until_ms = now_ms() + int(self.tuning.learned_window_s * 1000)
        await self._write(deployment_health_key(deployment.key), {"window_tokens": tokens, "window_until_ms": until_ms})

    async def cool(self, deployment: Deployment, seconds: float) -> None:
        """Keep every worker off this deployment for `seconds` (upstream 429)."""
        await self._write(deployment_health_key(deployment.key),
                          {"cooling_until_ms": now_ms() + int(seconds * 1000)},
                          drop=deployment_probe_key(deployment.key))

    async def park(self, deployment: Deployment, api_key: str | None, scope: str, seconds: float) -> int:
        """Take this key's quota (for this model, if its scope is "model") out until `seconds` from now.

        A keyless deployment cools instead. Returns the unix ms it is parked until.
        """
        until_ms = now_ms() + int(seconds * 1000)
        if api_key is None:
            await self.cool(deployment, seconds)
            return until_ms
        key_state = upstream_key_state_key(deployment.provider.id, key_fingerprint(api_key))
        await self._park(keys=[key_state], args=[park_field(deployment, scope), until_ms, _HEALTH_TTL_MS])
        return until_ms

    async def ban_key(self, deployment: Deployment, api_key: str) -> None:
        """Take an upstream key out of rotation (it got 401/403)."""
        await self.ban(deployment.provider.id, api_key)

    async def ban(self, provider: str, api_key: str) -> None:
        """Take one of a provider's keys out of rotation for key_ban_s."""
        await self._write(upstream_key_state_key(provider, key_fingerprint(api_key)),
                          {"banned_until_ms": now_ms() + int(self.tuning.key_ban_s * 1000)})

    async def _write(self, key: str, fields: Mapping[str, int | str], drop: str | None = None) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=dict(fields))
            pipe.pexpire(key, _HEALTH_TTL_MS)
            if drop is not None:
                pipe.delete(drop)
            await pipe.execute()

    async def set_gone(self, deployment_keys: Mapping[str, bool]) -> None:
        """Mark deployments as vanished from (or back in) their provider's /models."""
        if not deployment_keys:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, gone in deployment_keys.items():
                pipe.hset(deployment_health_key(key), "gone", "1" if gone else "0")
                pipe.pexpire(deployment_health_key(key), _HEALTH_TTL_MS)
            await pipe.execute()


def quota_scope(deployment: Deployment) -> str:
    """What the provider's limits apply to: "key", "model" or "account" (profile data)."""
    return deployment.provider.config.profile.limits.scope


def park_field(deployment: Deployment, scope: str) -> str:
    """The key-state field a park at this scope writes (a key stands for its account)."""
    return f"{MODEL_PARK_PREFIX}{deployment.model.upstream_name}" if scope == "model" else "exhausted_until_ms"


def snapshot_keys(deployments: Sequence[Deployment]) -> list[str]:
    """The hashes a snapshot of these deployments reads: each deployment's, then each key's."""
    return ([deployment_health_key(d.key) for d in deployments] +
            [upstream_key_state_key(provider, fingerprint) for provider, fingerprint in _key_ids(deployments)])


def snapshot_from(deployments: Sequence[Deployment], hashes: Sequence[Mapping[bytes, bytes]],
                  at_ms: int) -> HealthSnapshot:
    """A snapshot from the HGETALL replies of snapshot_keys(deployments), in that order.

    The worker's claim script reads them in the same call that claims a job (workers/main.py).
    """
    snap = HealthSnapshot(at_ms=at_ms)
    for d, raw in zip(deployments, hashes[:len(deployments)], strict=True):
        snap.deployments[d.key] = DeploymentHealth.from_hash(raw)
    for key_id, raw in zip(_key_ids(deployments), hashes[len(deployments):], strict=True):
        snap.keys[key_id] = KeyState.from_hash(raw)
    return snap


def _key_ids(deployments: Sequence[Deployment]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((d.provider.id, key_fingerprint(k)) for d in deployments for k in d.provider.api_keys))
