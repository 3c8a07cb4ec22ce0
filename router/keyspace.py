"""Redis names and record shapes of the routing layer's shared state.

Deployment health, upstream key quota, the live catalog and provider status are written by the
workers' routing code (router/health.py, router/refresh.py) and partly read by the API
(/v1/models, /admin/providers, /metrics). This module owns their names, so the router needs
nothing from the layers above it; workers/protocol.py re-exports what the API reads, the API
importing nothing but that module. The names are the ones earlier releases used: an upgrade
keeps every breaker, park and learned window.
"""

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- Deployment health, shared by every worker and read by the API (/v1/models, /v1/models/random).
# A deployment is "provider/model"; its health is one hash so a worker reads the health of all
# its candidates in one pipelined round trip.
def deployment_health_key(deployment: str) -> str:
    """Hash of the DeploymentHealth fields of one deployment."""
    return f"ff:health:{deployment}"


def deployment_probe_key(deployment: str) -> str:
    """Claimed (SET NX PX) by the one worker allowed to probe a half-open breaker."""
    return f"ff:probe:{deployment}"


def upstream_key_state_key(provider: str, key_fingerprint: str) -> str:
    """Quota / ban state of one upstream provider key, named by a fingerprint, never the key."""
    return f"ff:keyq:{provider}:{key_fingerprint}"


# Fields of a key-state hash named "m:<upstream model>": that key's quota for that model is out
# until then (providers whose limits apply per model); the other fields are the key's own.
MODEL_PARK_PREFIX = "m:"
# Fields named "q:<upstream model>": "<remaining>/<limit>" requests the last answer for that model
# reported, where each model has its own quota (the key-level remaining_requests otherwise).
MODEL_QUOTA_PREFIX = "q:"


def key_quota_view(raw: Mapping[bytes, bytes], now_ms: int) -> dict[str, Any] | None:
    """A key-state hash as people read it: headroom and what sits out until when (future times only)."""
    fields = {k.decode(): v.decode() for k, v in raw.items()}

    def number(name: str) -> int | None:
        try:
            return int(float(fields[name])) if fields.get(name) else None
        except ValueError:
            return None

    view: dict[str, Any] = {}
    for name in ("remaining_requests", "limit_requests"):
        if (value := number(name)) is not None:
            view[name] = value
    for name, shown in (("exhausted_until_ms", "parked_until_ms"), ("banned_until_ms", "banned_until_ms")):
        if (value := number(name)) is not None and value > now_ms:
            view[shown] = value
    models = {name[len(MODEL_PARK_PREFIX):]: value for name in fields if name.startswith(MODEL_PARK_PREFIX)
              and (value := number(name)) is not None and value > now_ms}
    if models:
        view["models_parked_until_ms"] = models
    remaining = {name[len(MODEL_QUOTA_PREFIX):]: fields[name] for name in fields if name.startswith(MODEL_QUOTA_PREFIX)}
    if remaining:
        view["models_remaining_requests"] = remaining  # "<remaining>/<limit>"
    return view or None


def catalog_refresh_lock_key(provider: str) -> str:
    """Short lock: one worker re-reads a provider's /models per period."""
    return f"ff:catalog:refresh:{provider}"


# Hash deployment → LiveDeployment JSON, refreshed by every worker: what is routable somewhere.
LIVE_DEPLOYMENTS_KEY = "ff:deployments"
# Hash deployment → ModelCard JSON, written with it: what the worker routes that model as (its
# catalog entry as the provider's listing corrected it, or a model the listing added). A hash of
# its own, so an API of an earlier release, which reads LIVE_DEPLOYMENTS_KEY strictly, is unaffected.
LIVE_MODEL_CARDS_KEY = "ff:deployments:cards"
# Hash provider → what its model listing taught ({"context": {model: window}, "added": [model]}),
# written by the worker that refreshed it, applied by every worker (router/refresh.py).
LEARNED_CATALOG_KEY = "ff:catalog:learned"
# Hash provider → ProviderStatus JSON: its last check, per key (GET /admin/providers).
PROVIDER_STATUS_KEY = "ff:providers:status"


class ModelCard(_Model):
    """A model as a worker routes it (LIVE_MODEL_CARDS_KEY): enough for the API to list and pin it."""

    name: str | None = None
    context_window: int
    capabilities: list[str]
    lacks: list[str] = []
    scores: dict[str, float]
    created: int
    discovered: bool = False  # added from the provider's listing: not in the catalog file


class LiveDeployment(_Model):
    """One deployment a worker can route to (it published this at most a few seconds ago)."""

    model: str
    provider: str
    seen_ms: int


class KeyCheck(_Model):
    """What one upstream key's model listing answered (the key named by its fingerprint only)."""

    fingerprint: str
    reachable: bool  # the provider answered at all
    valid: bool | None  # False: 401/403; None: the answer says nothing about the key
    status: int | None = None
    detail: str = ""  # why it failed, sanitized
    listed: int | None = None


class ProviderStatus(_Model):
    """The last check of one provider: its keys, and its listing against the catalog."""

    provider: str
    enabled: bool = True
    reason: str = ""  # why it is disabled
    checked_ms: int = 0
    keys: list[KeyCheck] = []
    listed: int | None = None  # models the listing has (None: no listing read)
    configured: int = 0  # models the catalog has for it
    new: list[str] = []  # listed, not in the catalog (added when the provider discovers)
    added: list[str] = []  # of those, routed now
    vanished: list[str] = []  # in the catalog, no longer listed (out of rotation)
    context_changed: dict[str, list[int]] = {}  # model → [catalog window, listed window]


# Fields of a health hash named "nf:<feature>": the deployment said it does not take that
# feature or field ("tools", "vision", "json", "logprobs", …) and is kept from requests needing
# it until then (unix ms). Shared by every worker; lapsed ones are deleted by the next mark.
UNSUPPORTED_PREFIX = "nf:"


class DeploymentHealth(BaseModel):
    """The health hash of one deployment; times are unix milliseconds, 0 = unset. Frozen: what a
    request learns goes into a copy (model_copy), and one fresh instance serves every unseen one."""

    model_config = ConfigDict(frozen=True)

    fails: int = 0  # consecutive failures
    open_until_ms: int = 0  # breaker open until; > 0 and past = half-open (one probe allowed)
    cooldown_ms: int = 0  # the breaker's current cooldown, doubled on each failed probe up to its cap
    cooling_until_ms: int = 0  # from an upstream 429 Retry-After
    ewma_ms: float = -1.0  # time to the first token, exponentially weighted mean; -1 = never measured
    ttft_var_ms2: float = 0.0  # its exponentially weighted variance (for a p95 estimate)
    gone: bool = False  # the provider's /models no longer lists it
    # A context window the provider stated in an error ("maximum context length is 8192 tokens",
    # a 413 token cap), smaller than the catalog's: routed by until window_until_ms.
    window_tokens: int = 0
    window_until_ms: int = 0
    # feature or field → refused until (UNSUPPORTED_PREFIX fields). A factory, not a {} default:
    # pydantic copies a mutable default per instance, and one is made per candidate per request.
    unsupported: dict[str, int] = Field(default_factory=dict)

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes]) -> "DeploymentHealth":
        """Parse HGETALL output (missing fields keep their defaults; unknown ones are ignored).

        Converted by hand first (pydantic's own coercion of strings costs more, and the claim
        parses every deployment's hash for every job).
        """
        values: dict[str, Any] = {}
        marks: dict[str, int] = {}
        for key, value in raw.items():
            name = key.decode()
            kind = _HEALTH_FIELDS.get(name)
            try:
                if kind is int:
                    values[name] = int(float(value))
                elif kind is float:
                    values[name] = float(value)
                elif kind is bool:
                    values[name] = value in (b"1", b"true", b"True")
                elif name.startswith(UNSUPPORTED_PREFIX):
                    marks[name[len(UNSUPPORTED_PREFIX):]] = int(float(value))
            except ValueError:
                continue  # a field written by hand or by another release: its default stands
        if marks:
            values["unsupported"] = marks
        return cls(**values)

    def state(self, now_ms: int) -> Literal["gone", "open", "cooling", "half_open", "closed"]:
        """Where the breaker stands at `now_ms`."""
        if self.gone:
            return "gone"
        if self.open_until_ms > now_ms:
            return "open"
        if self.cooling_until_ms > now_ms:
            return "cooling"
        return "half_open" if self.open_until_ms else "closed"

    def blocked_for_ms(self, now_ms: int) -> int:
        """How long until this deployment may be tried again (0 = now)."""
        return max(self.open_until_ms - now_ms, self.cooling_until_ms - now_ms, 0)

    def window(self, catalog_window: int, now_ms: int) -> int:
        """The context window to route by: the catalog's, or a smaller one the provider stated."""
        if 0 < self.window_tokens < catalog_window and self.window_until_ms > now_ms:
            return self.window_tokens
        return catalog_window

    def lacks(self, feature: str, now_ms: int) -> bool:
        """The deployment said it does not take `feature`, and that is still remembered."""
        return self.unsupported.get(feature, 0) > now_ms

    def ttft_p95_ms(self) -> float | None:
        """An estimate of the 95th percentile time to the first token (None: never measured)."""
        if self.ewma_ms < 0:
            return None
        return self.ewma_ms + 1.645 * math.sqrt(max(self.ttft_var_ms2, 0.0))


# How each field of a health hash is read (DeploymentHealth.from_hash).
_HEALTH_FIELDS: dict[str, type] = {
    "fails": int, "open_until_ms": int, "cooldown_ms": int, "cooling_until_ms": int, "ewma_ms": float,
    "ttft_var_ms2": float, "gone": bool, "window_tokens": int, "window_until_ms": int,
}
