"""GET /v1/models, /v1/models/random and /v1/models/{id}: what the workers can route right now.

Two kinds of model ids are listed: the capability ids (`text-basic`, `code`, `reasoning` … and
`auto`, owned by `freeference`), which every key may send and which fail over inside their
capability; and the exact upstream models, which only pro keys may pin (so only pro keys see
them listed). A capability's context window and capabilities are those of its candidates that
a worker can route right now.

The API imports no routing code: the catalog file says what models are, the workers publish
which deployments they can serve (LIVE_DEPLOYMENTS_KEY) and their shared health hashes say
which are healthy. Both are read with one round trip each.
"""

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis

from api.admission import charge_random_model
from api.deps import CatalogDep, CurrentKey, RedisDep, SettingsDep
from api.errors import OpenAIError
from api.keys import KeyRecord
from settings import Settings
from settings.catalog import CatalogFile, ModelConfig, embedding_capability_space
from workers.protocol import LIVE_DEPLOYMENTS_KEY, DeploymentHealth, LiveDeployment, deployment_health_key

router = APIRouter()

# With no health information to go on, a caller asking for a random model retries after this.
_DEFAULT_RETRY_AFTER_S = 5
AUTO = "auto"
# Capability ids have no creation date of their own; this is the gateway's first release.
_CAPABILITY_CREATED = 1_735_689_600


@dataclass(frozen=True)
class Routable:
    """One deployment a worker can route right now."""

    key: str
    model: ModelConfig
    provider: str
    health: DeploymentHealth


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


async def routable_deployments(redis: Redis, settings: Settings, catalog: CatalogFile) -> dict[str, list[Routable]]:
    """Model id → its live deployments that have not vanished upstream, in catalog order."""
    live = await _live(redis, settings)
    health = await _health(redis, sorted(live))
    models = {m.id: m for m in catalog.models}
    by_model: dict[str, list[Routable]] = defaultdict(list)
    for key, entry in live.items():
        model = models.get(entry.model)
        if model is not None and not health[key].gone:
            by_model[entry.model].append(Routable(key, model, entry.provider, health[key]))
    return {m.id: by_model[m.id] for m in catalog.models if m.id in by_model}


def _candidates(catalog: CatalogFile, by_model: dict[str, list[Routable]], capability: str) -> list[Routable]:
    """The routable deployments of a capability id (every intent for `auto`), best score first."""
    if capability == AUTO:
        found = [r for deployments in by_model.values() for r in deployments if not r.model.embeds]
        return sorted(found, key=lambda r: -max(r.model.scores.values(), default=0.0))
    if catalog.embedding_capability(capability):  # one vector space, as the workers route it
        space = embedding_capability_space(catalog.models, by_model)
        return [r for deployments in by_model.values() for r in deployments
                if r.model.embeds and r.model.space == space]
    intent = catalog.capabilities[capability].intent
    found = [r for deployments in by_model.values() for r in deployments if intent in r.model.scores]
    return sorted(found, key=lambda r: -r.model.scores[intent])


def _capability_card(capability: str, candidates: list[Routable]) -> dict[str, Any]:
    features = dict.fromkeys(c for r in candidates for c in r.model.capabilities)
    return {"id": capability, "object": "model", "created": _CAPABILITY_CREATED, "owned_by": "freeference",
            "context_window": max(r.model.context_window for r in candidates), "capabilities": list(features)}


def _model_card(model: ModelConfig, owned_by: str) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": owned_by,
            "context_window": model.context_window, "capabilities": list(model.capabilities)}


def _capability_ids(catalog: CatalogFile) -> list[str]:
    return [*catalog.capabilities, AUTO]


def _may_pin(key: KeyRecord) -> bool:
    return key.tier == "pro"


@router.get("/v1/models")
async def list_models(key: CurrentKey, redis: RedisDep, settings: SettingsDep, catalog: CatalogDep) -> dict[str, Any]:
    """The capability ids with a routable candidate, then (pro keys) every routable exact model."""
    by_model = await routable_deployments(redis, settings, catalog)
    cards = [_capability_card(capability, candidates) for capability in _capability_ids(catalog)
             if (candidates := _candidates(catalog, by_model, capability))]
    if _may_pin(key):
        cards += [_model_card(deployments[0].model, deployments[0].provider) for deployments in by_model.values()]
    return {"object": "list", "data": cards}


@router.get("/v1/models/random")
async def random_model(request: Request, key: CurrentKey, redis: RedisDep, settings: SettingsDep,
                       catalog: CatalogDep) -> JSONResponse:
    """A random model with a healthy deployment right now, as an id this key may send (10 an hour per key).

    Free keys get a capability id (its healthy candidates fail over among themselves); pro keys
    an exact model. `contextWindow` and `providerId` are those of the deployment serving it now.
    """
    limit_headers = await charge_random_model(request, key, settings.models_random_per_hour)
    by_model = await routable_deployments(redis, settings, catalog)
    now_ms = int(time.time() * 1000)
    # A chat model: an embedding model is no answer to "which model can I chat with".
    healthy = {model_id: [r for r in deployments if r.health.state(now_ms) == "closed" and not r.model.embeds]
               for model_id, deployments in by_model.items()}
    healthy = {model_id: deployments for model_id, deployments in healthy.items() if deployments}
    if not healthy:
        waits = [r.health.blocked_for_ms(now_ms) for deployments in by_model.values() for r in deployments
                 if r.health.blocked_for_ms(now_ms)]
        retry_after_s = max(1, round(min(waits) / 1000)) if waits else _DEFAULT_RETRY_AFTER_S
        raise OpenAIError(503, "No model has a healthy deployment right now.", code="no_models_available",
                          headers={**limit_headers, "Retry-After": str(retry_after_s)})
    if _may_pin(key):
        serving = random.choice([r for deployments in healthy.values() for r in deployments])
        model = serving.model
        body = {"modelId": model.id, "name": model.name or model.id,
                "capabilityMapping": _best_capability(catalog, model), "contextWindow": model.context_window,
                "providerId": serving.provider}
    else:
        offered = {capability: candidates for capability in catalog.chat_capabilities()
                   if (candidates := _candidates(catalog, healthy, capability))}
        capability = random.choice(sorted(offered))
        serving = offered[capability][0]  # the best healthy candidate is what serves it now
        body = {"modelId": capability, "name": catalog.capabilities[capability].name,
                "capabilityMapping": capability, "contextWindow": serving.model.context_window,
                "providerId": serving.provider}
    return JSONResponse(body, headers=limit_headers)


def _best_capability(catalog: CatalogFile, model: ModelConfig) -> str:
    """The capability id whose intent the model scores best in."""
    chat = catalog.chat_capabilities()
    ranked = sorted(((model.scores.get(cap.intent, -1.0), cap_id) for cap_id, cap in chat.items()),
                    key=lambda pair: -pair[0])
    return ranked[0][1] if ranked and ranked[0][0] >= 0 else AUTO


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, _: CurrentKey, redis: RedisDep, settings: SettingsDep,
                         catalog: CatalogDep) -> dict[str, Any]:
    """One capability id or exact model (ids may contain '/' and ':'), if some worker can route to it."""
    by_model = await routable_deployments(redis, settings, catalog)
    if model_id in _capability_ids(catalog):
        candidates = _candidates(catalog, by_model, model_id)
        if candidates:
            return _capability_card(model_id, candidates)
    elif model_id in by_model:
        serving = by_model[model_id][0]
        return _model_card(serving.model, serving.provider)
    raise OpenAIError(404, f"The model '{model_id}' does not exist or is not available.", code="model_not_found",
                      param="model")
