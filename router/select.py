"""Candidate selection: which deployments may serve a request, best first."""

from collections.abc import Sequence
from typing import Any

import orjson

from router.catalog import Deployment, RuntimeCatalog
from router.health import HealthSnapshot
from settings.catalog import Intent

# Ranking ties are broken by latency in buckets this wide, so noise does not reshuffle them.
_LATENCY_BUCKET_MS = 250.0


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


def fits(deployment: Deployment, needed_tokens: int) -> bool:
    """The deployment's context window holds the estimated prompt and completion."""
    return deployment.model.context_window >= needed_tokens


def rank(groups: Sequence[Sequence[Deployment]], intent: Intent, health: HealthSnapshot,
         needed_tokens: int) -> list[Deployment]:
    """Candidates that fit and may be tried now, best first.

    Groups keep their order (the requested model or capability before each explicit fallback);
    inside a group: score for the intent, then a closed breaker before a half-open one, then
    latency EWMA, then quota headroom. Raises NothingFits / NoneAvailable when nothing is left.
    """
    fitting = [[d for d in group if fits(d, needed_tokens)] for group in groups]
    if not any(fitting):
        raise NothingFits(needed_tokens)
    now = health.at_ms
    ranked: list[Deployment] = []
    waits_ms: list[int] = []
    for group in fitting:
        usable: list[Deployment] = []
        for d in group:
            wait_ms = _blocked_for_ms(d, health)
            if wait_ms == 0:
                usable.append(d)
            elif wait_ms is not None:
                waits_ms.append(wait_ms)

        def sort_key(d: Deployment, group: list[Deployment] = group) -> tuple[float, ...]:
            h = health.of(d)
            latency_bucket = (h.ewma_ms // _LATENCY_BUCKET_MS) if h.ewma_ms >= 0 else 0.0
            return (-d.score(intent), 1.0 if h.state(now) == "half_open" else 0.0, latency_bucket,
                    -health.headroom(d), group.index(d))

        ranked.extend(sorted(usable, key=sort_key))
    if not ranked:
        raise NoneAvailable(max(min(waits_ms, default=5000) / 1000, 1.0), wait_known=bool(waits_ms))
    return ranked


def _blocked_for_ms(d: Deployment, health: HealthSnapshot) -> int | None:
    """0 when the deployment may be tried now, else how long until it may (None: unknown, gone)."""
    h = health.of(d)
    state = h.state(health.at_ms)
    if state == "gone":
        return None
    if state in ("open", "cooling"):
        return h.blocked_for_ms(health.at_ms)
    if not d.provider.api_keys or health.usable_keys(d):
        return 0
    states = [health.key(d.provider.id, k) for k in d.provider.api_keys]
    return max(min(s.blocked_until_ms(d.model.upstream_name) for s in states) - health.at_ms, 1)
