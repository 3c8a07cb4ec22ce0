"""Catalog refresh: re-read each provider's model listing with every key; keep the catalog alive.

Providers retire, add and resize free models without notice. One worker per period (a short
Redis lock per provider) lists the provider's models with each of its keys and:

- marks a catalog model the listing no longer has gone (every worker skips it at once), and
  back when it reappears;
- corrects context windows from what the listing reports (profile.models.update_context);
- adds models the listing has and the catalog lacks, scored by family (profile.models.discover);
- takes a key the listing refuses (401) out of rotation;
- records what it found per provider and key (PROVIDER_STATUS_KEY: `GET /admin/providers`).

What a listing taught is shared in Redis (LEARNED_CATALOG_KEY) and every worker applies it on
its next tick. Each worker also re-publishes its own deployments so the API can list exactly
what is routable (LIVE_DEPLOYMENTS_KEY), and as what (LIVE_MODEL_CARDS_KEY: windows and features
as the listings corrected them, and the models they added, which the API then lists and pins).
`freeference providers check` runs the same check.
"""

import asyncio
import fnmatch
import logging
import time

import httpx
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.catalog import ProviderRuntime, RuntimeCatalog
from router.discovery import Learned, ListedModel, learn, parse_listing
from router.health import HealthStore, key_fingerprint, now_ms
from router.keyspace import (
    LEARNED_CATALOG_KEY,
    LIVE_DEPLOYMENTS_KEY,
    LIVE_MODEL_CARDS_KEY,
    PROVIDER_STATUS_KEY,
    KeyCheck,
    LiveDeployment,
    ModelCard,
    ProviderStatus,
    catalog_refresh_lock_key,
)
from router.providers.sanitize import sanitize
from router.providers.sse import TooLarge, read_capped
from settings.catalog import CatalogFile
from settings.logfields import STORE_DOWN

log = logging.getLogger("freeference.catalog")

_LIST_TIMEOUT_S = 10.0
# OpenRouter's full listing is a few MB; nothing a provider lists needs more.
_LISTING_MAX_BYTES = 32 * 1024 * 1024
# The status names at most this many new models (OpenRouter lists hundreds of paid ones).
_STATUS_MAX_NAMES = 50


def listed_names(payload: bytes) -> set[str] | None:
    """Model names in a listing (Gemini prefixes them with 'models/'), or None if it is not one."""
    listing = parse_listing(payload)
    return {m.id for m in listing} if listing else None


def models_url(provider: ProviderRuntime) -> str:
    """The listing's URL: the profile's, relative to base_url unless absolute."""
    url = provider.config.profile.models.url
    return url if url.startswith(("http://", "https://")) else f"{provider.base_url}/{url.lstrip('/')}"


async def list_with_key(client: httpx.AsyncClient, provider: ProviderRuntime,
                        api_key: str | None) -> tuple[KeyCheck, list[ListedModel] | None]:
    """One key's view of the provider's listing."""
    fingerprint = key_fingerprint(api_key) if api_key else "-"
    headers = {**provider.config.headers}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        async with asyncio.timeout(_LIST_TIMEOUT_S):
            async with client.stream("GET", models_url(provider), headers=headers,
                                     timeout=_LIST_TIMEOUT_S) as response:
                body = await read_capped(response, _LISTING_MAX_BYTES)
                status = response.status_code
    except (TimeoutError, httpx.HTTPError) as exc:
        return KeyCheck(fingerprint=fingerprint, reachable=False, valid=None, detail=type(exc).__name__), None
    except TooLarge:
        return KeyCheck(fingerprint=fingerprint, reachable=True, valid=None, status=200,
                        detail=f"listing over {_LISTING_MAX_BYTES} bytes"), None
    if status != 200:
        valid = False if status in (401, 403) else None
        detail = sanitize(body.decode("utf-8", "replace"))[:120]
        return KeyCheck(fingerprint=fingerprint, reachable=True, valid=valid, status=status, detail=detail), None
    listing = parse_listing(body)
    if not listing:  # an empty or unreadable listing is more likely a glitch than every model retired
        return KeyCheck(fingerprint=fingerprint, reachable=True, valid=True, status=200,
                        detail="no readable listing"), None
    return KeyCheck(fingerprint=fingerprint, reachable=True, valid=True, status=200, listed=len(listing)), listing


async def check_provider(client: httpx.AsyncClient, provider: ProviderRuntime,
                         file: CatalogFile) -> tuple[ProviderStatus, Learned | None]:
    """List the provider's models with every key; the status, and what the listings teach (None: nothing read)."""
    checks: list[KeyCheck] = []
    merged: dict[str, ListedModel] = {}
    for api_key in provider.api_keys or (None,):
        check, listing = await list_with_key(client, provider, api_key)
        checks.append(check)
        for model in listing or ():
            merged.setdefault(model.id, model)
    configured = [m for m in file.models if m.provider == provider.id]
    status = ProviderStatus(provider=provider.id, checked_ms=now_ms(), keys=checks, configured=len(configured))
    if not merged:
        return status, None
    learned = learn(file, provider.config, list(merged.values()))
    known = {m.upstream_name for m in configured}
    endpoint = provider.config.profile.models
    new = sorted(m for m in merged if m not in known and (not endpoint.match or _matches(m, endpoint.match)))
    by_id = {m.id: m for m in configured}
    status = status.model_copy(update={
        "listed": len(merged), "new": new[:_STATUS_MAX_NAMES], "added": sorted(m.id for m in learned.added),
        "vanished": sorted(learned.gone),
        "context_changed": {mid: [by_id[mid].context_window, window] for mid, window in learned.context.items()},
    })
    return status, learned


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


class CatalogRefresher:
    """Background loop in every worker; see the module docstring."""

    def __init__(self, redis: Redis, catalog: RuntimeCatalog, client: httpx.AsyncClient, health: HealthStore,
                 publish_every_s: float) -> None:
        self._redis = redis
        self._catalog = catalog
        self._client = client
        self._health = health
        self._publish_every_s = publish_every_s
        self._learned_raw: dict[bytes, bytes] | None = None
        self._skipped_published = False

    def tick_s(self) -> float:
        """How often the loop wakes: the publish period or the shortest refresh period."""
        periods = [p.config.refresh_models_s for p in self._catalog.providers.values() if p.config.refresh_models_s]
        return max(min([self._publish_every_s, *periods]), 0.2)

    async def run_forever(self) -> None:
        """Apply, refresh and publish until cancelled; Redis or provider outages are waited out."""
        while True:
            try:
                await self.sync_learned()
                await self.publish_live()
                await self._publish_skipped()
                for provider in self._catalog.providers.values():
                    await self.maybe_refresh(provider)
                await self.sync_learned()
            except (RedisError, OSError) as exc:
                log.warning("catalog refresh skipped: %s", type(exc).__name__, extra=STORE_DOWN)
            await asyncio.sleep(self.tick_s())

    async def publish_live(self) -> None:
        """Tell the API which deployments this worker can route (with a fresh timestamp), and as what."""
        if not self._catalog.deployments:
            return
        seen = now_ms()
        entries = {d.key: LiveDeployment(model=d.model.id, provider=d.provider.id, seen_ms=seen).model_dump_json()
                   for d in self._catalog.deployments}
        in_file = {(m.id, m.provider) for m in self._catalog.file.models}
        cards = {d.key: ModelCard(name=d.model.name, context_window=d.model.context_window,
                                  capabilities=list(d.model.capabilities), lacks=list(d.model.lacks),
                                  scores={str(k): v for k, v in d.model.scores.items()}, created=d.model.created,
                                  discovered=(d.model.id, d.provider.id) not in in_file).model_dump_json()
                 for d in self._catalog.deployments}
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(LIVE_DEPLOYMENTS_KEY, mapping=entries)
            pipe.hset(LIVE_MODEL_CARDS_KEY, mapping=cards)
            await pipe.execute()

    async def sync_learned(self) -> None:
        """Apply what any worker's refresh taught (only when it changed since the last look)."""
        raw = await self._redis.hgetall(LEARNED_CATALOG_KEY)  # type: ignore[misc]
        if raw == self._learned_raw:
            return
        self._learned_raw = raw
        learned = {}
        for provider, payload in raw.items():
            try:
                learned[provider.decode()] = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
        if self._catalog.apply_learned(learned):
            log.info("catalog now has %d deployments (after the providers' listings)", len(self._catalog.deployments))

    async def maybe_refresh(self, provider: ProviderRuntime) -> None:
        """Refresh one provider if no worker did within its period."""
        period_s = provider.config.refresh_models_s
        if not period_s:
            return
        lock = catalog_refresh_lock_key(provider.id)
        if not await self._redis.set(lock, b"1", nx=True, px=max(int(period_s * 1000), 100)):
            return
        status, learned = await check_provider(self._client, provider, self._catalog.file)
        await self._ban_refused_keys(provider, status)
        if learned is not None:
            await self._apply(provider, learned)
        await self._redis.hset(PROVIDER_STATUS_KEY, provider.id, status.model_dump_json())  # type: ignore[misc]

    async def _apply(self, provider: ProviderRuntime, learned: Learned) -> None:
        gone = {f"{provider.id}/{model.id}": model.id in learned.gone
                for model in self._catalog.file.models if model.provider == provider.id}
        if learned.gone:
            log.warning("provider %s no longer lists %s: out of rotation", provider.id, ", ".join(learned.gone))
        if learned.added:
            log.info("provider %s lists %d models the catalog lacks: routed by family scores (%s)", provider.id,
                     len(learned.added), ", ".join(m.id for m in learned.added[:10]))
        for model_id, window in learned.context.items():
            log.info("provider %s reports a %d-token window for %s", provider.id, window, model_id)
        await self._health.set_gone(gone)
        await self._redis.hset(LEARNED_CATALOG_KEY, provider.id, learned.to_json().decode())  # type: ignore[misc]

    async def _ban_refused_keys(self, provider: ProviderRuntime, status: ProviderStatus) -> None:
        for api_key, check in zip(provider.api_keys, status.keys, strict=False):
            if check.status == 401:
                await self._health.ban(provider.id, api_key)
                log.warning("provider %s refused a key (401) when listing models: out of rotation", provider.id)

    async def _publish_skipped(self) -> None:
        if self._skipped_published:
            return
        self._skipped_published = True
        for provider_id, why in self._catalog.skipped.items():
            status = ProviderStatus(provider=provider_id, enabled=False, reason=why, checked_ms=int(time.time() * 1000))
            await self._redis.hsetnx(PROVIDER_STATUS_KEY, provider_id, status.model_dump_json())  # type: ignore[misc]
