"""Liveness, readiness and Prometheus metrics."""

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from api.deps import CatalogDep, RedisDep, SettingsDep
from api.metrics import Metrics, live_worker_infos
from api.routes.models import routable_deployments

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (liveness only: it says nothing about Redis, workers or providers)."""
    return {"status": "ok"}


def _enabled(infos: list[bytes]) -> int | None:
    """Deployments the live workers can route at all (the most any reports); None if none says."""
    counts = []
    for raw in infos:
        try:
            value = orjson.loads(raw).get("deployments")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, int):
            counts.append(value)
    return max(counts) if counts else None


@router.get("/readyz")
async def readyz(request: Request, redis: RedisDep, settings: SettingsDep, catalog: CatalogDep) -> JSONResponse:
    """Ready when Redis answers, the reply channel is subscribed, a worker heart-beats and some
    deployment is routable; else 503 with the first reason it is not."""
    try:
        await redis.ping()
        workers = await live_worker_infos(redis)
        by_model = await routable_deployments(redis, settings, catalog)
    except (RedisError, OSError):
        return JSONResponse({"status": "unavailable", "redis": False, "workers": 0,
                             "reason": "Redis is unreachable"}, status_code=503)
    hub_ok = request.app.state.hub.connected
    routable = sum(len(deployments) for deployments in by_model.values())
    reason = None
    if not hub_ok:
        reason = "this API process is not subscribed to its reply channel yet"
    elif not workers:
        reason = "no worker is alive: start `freeference worker` processes (or `freeference serve`)"
    elif _enabled(workers) == 0:
        reason = ("no provider is enabled on any worker: give the workers a provider key (OPENROUTER_API_KEY, "
                  "GROQ_API_KEY, ... see the catalog) or run `freeference serve --demo`")
    elif not routable:
        reason = "no deployment is routable: the workers publish none, or every model left its provider's listing"
    body: dict[str, Any] = {"status": "unavailable" if reason else "ready", "redis": True, "workers": len(workers),
                            "reply_channel": hub_ok, "deployments": routable}
    if reason:
        body["reason"] = reason
    return JSONResponse(body, status_code=503 if reason else 200)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request, redis: RedisDep, settings: SettingsDep) -> Response:
    """Prometheus metrics of this API process plus cluster state read from Redis now."""
    collected: Metrics = request.app.state.metrics
    await collected.cluster.refresh(redis, settings.queue_name, request.app.state.hub.in_flight)
    return Response(generate_latest(collected.registry), media_type=CONTENT_TYPE_LATEST)
