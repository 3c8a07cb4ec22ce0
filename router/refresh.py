"""Catalog refresh: re-read each provider's /models, publish what this worker can route.

Providers retire free models without notice. One worker per period (a short Redis lock per
provider) lists the provider's models and marks each deployment gone or back in the shared
health; every worker skips gone deployments at once. Each worker also re-publishes its own
deployments so the API can list exactly what is routable (LIVE_DEPLOYMENTS_KEY).
"""

import asyncio
import logging

import httpx
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.catalog import ProviderRuntime, RuntimeCatalog
from router.health import HealthStore, now_ms
from settings.logfields import STORE_DOWN
from workers.protocol import LIVE_DEPLOYMENTS_KEY, LiveDeployment, catalog_refresh_lock_key

log = logging.getLogger("freeference.catalog")

_LIST_TIMEOUT_S = 10.0


def listed_names(payload: bytes) -> set[str] | None:
    """Model names in an OpenAI-style /models answer (Gemini prefixes them with 'models/')."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return None
    names = {str(item["id"]) for item in items if isinstance(item, dict) and item.get("id")}
    return names | {n.removeprefix("models/") for n in names}


class CatalogRefresher:
    """Background loop in every worker; see the module docstring."""

    def __init__(self, redis: Redis, catalog: RuntimeCatalog, client: httpx.AsyncClient, health: HealthStore,
                 publish_every_s: float) -> None:
        self._redis = redis
        self._catalog = catalog
        self._client = client
        self._health = health
        self._publish_every_s = publish_every_s

    def tick_s(self) -> float:
        """How often the loop wakes: the publish period or the shortest refresh period."""
        periods = [p.config.refresh_models_s for p in self._catalog.providers.values() if p.config.refresh_models_s]
        return max(min([self._publish_every_s, *periods]), 0.2)

    async def run_forever(self) -> None:
        """Publish and refresh until cancelled; Redis or provider outages are waited out."""
        while True:
            try:
                await self.publish_live()
                for provider in self._catalog.providers.values():
                    await self.maybe_refresh(provider)
            except (RedisError, OSError) as exc:
                log.warning("catalog refresh skipped: %s", type(exc).__name__, extra=STORE_DOWN)
            await asyncio.sleep(self.tick_s())

    async def publish_live(self) -> None:
        """Tell the API which deployments this worker can route (with a fresh timestamp)."""
        if not self._catalog.deployments:
            return
        seen = now_ms()
        entries = {d.key: LiveDeployment(model=d.model.id, provider=d.provider.id, seen_ms=seen).model_dump_json()
                   for d in self._catalog.deployments}
        await self._redis.hset(LIVE_DEPLOYMENTS_KEY, mapping=entries)  # type: ignore[misc]

    async def maybe_refresh(self, provider: ProviderRuntime) -> None:
        """Refresh one provider if no worker did within its period."""
        period_s = provider.config.refresh_models_s
        if not period_s:
            return
        lock = catalog_refresh_lock_key(provider.id)
        if not await self._redis.set(lock, b"1", nx=True, px=max(int(period_s * 1000), 100)):
            return
        names = await self.list_models(provider)
        if names is None:
            return  # an unreadable listing says nothing about the models: change nothing
        changes = {d.key: d.model.upstream_name not in names
                   for d in self._catalog.deployments if d.provider.id == provider.id}
        gone = sorted(k for k, is_gone in changes.items() if is_gone)
        if gone:
            log.warning("provider %s no longer lists %s: out of rotation", provider.id, ", ".join(gone))
        await self._health.set_gone(changes)

    async def list_models(self, provider: ProviderRuntime) -> set[str] | None:
        """The names GET {base_url}/models lists, or None when the provider did not answer usefully."""
        headers = {**provider.config.headers}
        if provider.api_keys:
            headers["Authorization"] = f"Bearer {provider.api_keys[0]}"
        try:
            response = await self._client.get(f"{provider.base_url}/models", headers=headers,
                                              timeout=_LIST_TIMEOUT_S)
        except httpx.HTTPError as exc:
            log.info("listing models of %s failed: %s", provider.id, type(exc).__name__)
            return None
        if response.status_code != 200:
            log.info("listing models of %s answered HTTP %d", provider.id, response.status_code)
            return None
        names = listed_names(response.content)
        return names or None  # an empty list is more likely a glitch than every model retired
