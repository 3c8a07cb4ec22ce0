"""GET /v1/models, /v1/models/random and /v1/models/{id}: what the workers can route right now.

The API imports no routing code: the catalog file says what models are, the workers publish
which deployments they can serve (LIVE_DEPLOYMENTS_KEY) and their shared health hashes say
which are healthy. Both are read with one round trip each.
"""

import random
import time
from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis

from api.admission import charge_random_model
from api.deps import CatalogDep, CurrentKey, RedisDep, SettingsDep
from api.errors import OpenAIError
from settings import Settings
from settings.catalog import CatalogFile, ModelConfig
from workers.protocol import LIVE_DEPLOYMENTS_KEY, DeploymentHealth, LiveDeployment, deployment_health_key

router = APIRouter()

# With no health information to go on, a caller asking for a random model retries after this.
_DEFAULT_RETRY_AFTER_S = 5


async def _live(redis: Redis, settings: Settings) -> dict[str, LiveDeployment]:
    """Deployment key → entry, for deployments a worker published recently."""
    raw = await redis.hgetall(LIVE_DEPLOYMENTS_KEY)  # type: ignore[misc]
    fresh_after_ms = int(time.time() * 1000 - 3 * settings.live_deployments_publish_s * 1000)
    live = {k.decode(): LiveDeployment.model_validate_json(v) for k, v in raw.items()}
    return {k: d for k, d in live.items() if d.seen_ms >= fresh_after_ms}


async def _health(redis: Redis, keys: list[str]) -> dict[str, DeploymentHealth]:
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(deployment_health_key(key))
        results = await pipe.execute()
    return {key: DeploymentHealth.from_hash(raw) for key, raw in zip(keys, results, strict=True)}


async def _routable(redis: Redis, settings: Settings, catalog: CatalogFile
                    ) -> tuple[dict[str, list[tuple[str, LiveDeployment]]], dict[str, DeploymentHealth]]:
    """Model id → its live, not-vanished deployments (key, entry); and their health."""
    live = await _live(redis, settings)
    health = await _health(redis, sorted(live))
    known = {m.id for m in catalog.models}
    by_model: dict[str, list[tuple[str, LiveDeployment]]] = defaultdict(list)
    for key, entry in live.items():
        if entry.model in known and not health[key].gone:
            by_model[entry.model].append((key, entry))
    return by_model, health


def _card(model: ModelConfig, owned_by: str) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": owned_by,
            "context_window": model.context_window, "capabilities": list(model.capabilities)}


def _first_model(catalog: CatalogFile, model_id: str) -> ModelConfig | None:
    return next((m for m in catalog.models if m.id == model_id), None)


@router.get("/v1/models")
async def list_models(_: CurrentKey, redis: RedisDep, settings: SettingsDep, catalog: CatalogDep) -> dict[str, Any]:
    """Every model some worker can route to right now (catalog order)."""
    by_model, _health_by_key = await _routable(redis, settings, catalog)
    cards: list[dict[str, Any]] = []
    for model in catalog.models:
        if model.id in by_model and all(c["id"] != model.id for c in cards):
            cards.append(_card(model, by_model[model.id][0][1].provider))
    return {"object": "list", "data": cards}


@router.get("/v1/models/random")
async def random_model(request: Request, key: CurrentKey, redis: RedisDep, settings: SettingsDep,
                       catalog: CatalogDep) -> JSONResponse:
    """A random model with a healthy deployment right now (10 requests/hour per key)."""
    limit_headers = await charge_random_model(request, key, settings.models_random_per_hour)
    by_model, health = await _routable(redis, settings, catalog)
    now_ms = int(time.time() * 1000)
    healthy = [(model_id, entry) for model_id, deployments in by_model.items()
               for key_name, entry in deployments if health[key_name].state(now_ms) == "closed"]
    if not healthy:
        waits = [h.blocked_for_ms(now_ms) for h in health.values() if not h.gone and h.blocked_for_ms(now_ms)]
        retry_after_s = max(1, round(min(waits) / 1000)) if waits else _DEFAULT_RETRY_AFTER_S
        raise OpenAIError(503, "No model has a healthy deployment right now.", code="no_models_available",
                          headers={**limit_headers, "Retry-After": str(retry_after_s)})
    model_id, entry = random.choice(healthy)
    model = _first_model(catalog, model_id)
    assert model is not None  # _routable keeps catalog models only
    capabilities = {cap_id: cap.name for cap_id, cap in catalog.capabilities.items() if cap.intent in model.scores}
    body = {"modelId": model.id, "name": model.name or model.id, "capabilityMapping": capabilities,
            "contextWindow": model.context_window, "providerId": entry.provider}
    return JSONResponse(body, headers=limit_headers)


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, _: CurrentKey, redis: RedisDep, settings: SettingsDep,
                         catalog: CatalogDep) -> dict[str, Any]:
    """One model (ids may contain '/' and ':'), if some worker can route to it."""
    model = _first_model(catalog, model_id)
    by_model, _health_by_key = await _routable(redis, settings, catalog) if model else ({}, {})
    if model is None or model_id not in by_model:
        raise OpenAIError(404, f"The model '{model_id}' does not exist or is not available.", code="model_not_found",
                          param="model")
    return _card(model, by_model[model_id][0][1].provider)
