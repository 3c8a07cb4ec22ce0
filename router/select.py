"""Candidate selection: which deployments may serve a request, best first, and why others may not."""

import functools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from router import capabilities
from router.catalog import Deployment, RuntimeCatalog
from router.health import HealthSnapshot
from settings.catalog import Intent

# Ranking ties are broken by latency in buckets this wide, so noise does not reshuffle them.
_LATENCY_BUCKET_MS = 250.0
# Quota headroom is compared in steps this wide when spreading: a few requests' difference is a tie.
_HEADROOM_STEP = 0.1


class NoCandidates(Exception):
    """Nothing in the catalog can serve this request right now."""


class NoneAvailable(NoCandidates):
    """Every candidate is cooling down, open or gone; the earliest is back in `retry_after_s`."""

    def __init__(self, retry_after_s: float, wait_known: bool = True) -> None:
        super().__init__(f"all candidates unavailable for {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s
        # False when nothing says any candidate comes back (all gone): waiting cannot help.
        self.wait_known = wait_known


class NothingFits(NoCandidates):
    """The prompt plus max_tokens is larger than every candidate's context window."""

    def __init__(self, needed_tokens: int) -> None:
        super().__init__(f"needs ~{needed_tokens} tokens")
        self.needed_tokens = needed_tokens


class NotCapable(NoCandidates):
    """No candidate has a feature the request needs (router/capabilities.py)."""

    def __init__(self, features: Sequence[str]) -> None:
        super().__init__(f"no candidate has {', '.join(features)}")
        self.features = list(features)


@dataclass(frozen=True)
class Skip:
    """A candidate passed over, and why: a short reason for the route header and the debug log."""

    deployment: str
    reason: str  # capability:<feature> · window · breaker · cooling · quota · gone (and, later, hedge, failed:…)
    score: float


@dataclass
class Ranking:
    """The candidates to try, in order, and those left out."""

    candidates: list[Deployment]
    skipped: list[Skip] = field(default_factory=list)
    groups: dict[str, int] = field(default_factory=dict)  # deployment → its fallback group (0: the request's own)


def candidate_groups(catalog: RuntimeCatalog, requested: str | None, intent: Intent,
                     fallbacks: Sequence[str] = ()) -> list[list[Deployment]]:
    """One group per model reference (None → the intent), then one per explicit fallback, in order;
    a deployment appears only in its first group."""
    seen: set[str] = set()
    groups: list[list[Deployment]] = []
    for name in (requested, *fallbacks):
        group = [d for d in _resolve(catalog, name, intent) if d.key not in seen]
        seen.update(d.key for d in group)
        if group:
            groups.append(group)
    if not groups:
        raise NoCandidates(requested or intent)
    return groups


def _resolve(catalog: RuntimeCatalog, name: str | None, intent: Intent) -> list[Deployment]:
    if name is None or name in ("", "auto"):
        return catalog.for_intent(intent)
    capability_intent = catalog.intent_of_capability(name)
    if capability_intent is not None:
        return catalog.for_intent(capability_intent)
    return catalog.by_model_id(name)


def estimate_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens plus the completion budget, estimated (about 4 characters a token)."""
    prompt = len(orjson.dumps(body.get("messages") or [])) // 4
    tools = len(orjson.dumps(body["tools"])) // 4 if body.get("tools") else 0
    completion = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return prompt + tools + int(completion)


def window(deployment: Deployment, health: HealthSnapshot) -> int:
    """The context window to route by: the catalog's, or a smaller one its provider stated."""
    h = health.deployments.get(deployment.key)
    if h is None or not h.window_tokens:
        return deployment.model.context_window
    return h.window(deployment.model.context_window, health.at_ms)


def fits(deployment: Deployment, needed_tokens: int, health: HealthSnapshot) -> bool:
    """The deployment's (effective) context window holds the estimated prompt and completion."""
    return window(deployment, health) >= needed_tokens


def rank(groups: Sequence[Sequence[Deployment]], intent: Intent, health: HealthSnapshot, needed_tokens: int, *,
         features: Sequence[str] = (), band: float = 0.0, rng: random.Random | None = None,
         inflight: Mapping[str, int] | None = None) -> Ranking:
    """Candidates that have what the request needs and may be tried now, best first.

    Groups keep their order (the requested model or capability before each explicit fallback).
    Inside a group: score for the intent, then a closed breaker before a half-open one, then
    latency EWMA, then quota headroom. With a `band`, the candidates scoring within it of the
    group's best share its traffic: two of them are drawn and the one with more quota headroom
    (then lower latency, then fewer requests in flight in this worker) goes first; a half-open
    one among them goes before it, so a recovered deployment is probed at once. Raises
    NotCapable / NothingFits / NoneAvailable when nothing is left.
    """
    now = health.at_ms
    skipped: list[Skip] = []
    capable = [[d for d in group if _capable(d, features, health, intent, skipped)] for group in groups]
    if not any(capable):
        raise NotCapable(capabilities.missing([d for g in groups for d in g], features, health.of, now))
    fitting = [[d for d in group if fits(d, needed_tokens, health) or _skip(d, "window", intent, skipped)]
               for group in capable]
    if not any(fitting):
        raise NothingFits(needed_tokens)
    ranked: list[Deployment] = []
    waits_ms: list[int] = []
    for group in fitting:
        usable: list[Deployment] = []
        for d in group:
            wait_ms, reason = _blocked_for_ms(d, health)
            if wait_ms == 0:
                usable.append(d)
                continue
            _skip(d, reason, intent, skipped)
            if wait_ms is not None:
                waits_ms.append(wait_ms)
        position = {id(d): i for i, d in enumerate(group)}  # by identity: comparing models is costly
        ordered = sorted(usable, key=functools.partial(_order, position=position, intent=intent, health=health))
        ranked.extend(_spread(ordered, intent, health, band, rng or random, inflight or {}))
    if not ranked:
        raise NoneAvailable(max(min(waits_ms, default=5000) / 1000, 1.0), wait_known=bool(waits_ms))
    return Ranking(ranked, skipped, {d.key: i for i, group in enumerate(groups) for d in group})


def _capable(d: Deployment, features: Sequence[str], health: HealthSnapshot, intent: Intent,
             skipped: list[Skip]) -> bool:
    h = health.of(d)
    for feature in features:
        if not capabilities.has(d, feature, h, health.at_ms):
            return _skip(d, f"capability:{feature}", intent, skipped)
    return True


def _skip(d: Deployment, reason: str, intent: Intent, skipped: list[Skip]) -> bool:
    skipped.append(Skip(d.key, reason, d.score(intent)))
    return False


def _order(d: Deployment, position: Mapping[int, int], intent: Intent, health: HealthSnapshot) -> tuple[float, ...]:
    h = health.of(d)
    latency_bucket = h.ewma_ms // _LATENCY_BUCKET_MS if h.ewma_ms >= 0 else 0.0
    return (-d.score(intent), 1.0 if h.state(health.at_ms) == "half_open" else 0.0, latency_bucket,
            -health.headroom(d), position[id(d)])


def _latency_bucket(d: Deployment, health: HealthSnapshot) -> float:
    ewma_ms = health.of(d).ewma_ms
    return ewma_ms // _LATENCY_BUCKET_MS if ewma_ms >= 0 else 0.0


def _spread(ordered: list[Deployment], intent: Intent, health: HealthSnapshot, band: float, rng: Any,
            inflight: Mapping[str, int]) -> list[Deployment]:
    """`ordered` with the pick of two random candidates of the top band first (see rank)."""
    if band <= 0 or len(ordered) < 2:
        return ordered
    floor = ordered[0].score(intent) - band - 1e-9
    top = [d for d in ordered if d.score(intent) >= floor]
    if len(top) < 2:
        return ordered
    probes = [d for d in top if health.of(d).state(health.at_ms) == "half_open"]
    closed = [d for d in top if d not in probes]
    if len(closed) < 2:
        return [*probes, *(d for d in ordered if d not in probes)]

    def load(d: Deployment) -> tuple[float, ...]:
        return (-round(health.headroom(d) / _HEADROOM_STEP), _latency_bucket(d, health), inflight.get(d.key, 0))

    first, second = rng.sample(closed, 2)
    pick = second if load(second) < load(first) else first
    return [*probes, pick, *(d for d in ordered if d is not pick and d not in probes)]


def _blocked_for_ms(d: Deployment, health: HealthSnapshot) -> tuple[int | None, str]:
    """(0 when the deployment may be tried now, else how long until it may (None: unknown, gone); why)."""
    h = health.of(d)
    state = h.state(health.at_ms)
    if state == "gone":
        return None, "gone"
    if state in ("open", "cooling"):
        return h.blocked_for_ms(health.at_ms), "breaker" if state == "open" else "cooling"
    if not d.provider.api_keys or health.usable_keys(d):
        return 0, ""
    states = [health.key(d.provider.id, k) for k in d.provider.api_keys]
    return max(min(s.blocked_until_ms(d.model.upstream_name) for s in states) - health.at_ms, 1), "quota"
