"""Liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from api.deps import RedisDep, SettingsDep
from api.metrics import Metrics, live_worker_infos

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, redis: RedisDep) -> JSONResponse:
    """Ready when Redis answers, the reply channel is subscribed and a worker heart-beats."""
    try:
        await redis.ping()
        workers = await live_worker_infos(redis)
    except (RedisError, OSError):
        return JSONResponse({"status": "unavailable", "redis": False, "workers": 0}, status_code=503)
    hub_ok = request.app.state.hub.connected
    ready = bool(workers) and hub_ok
    body = {"status": "ready" if ready else "unavailable", "redis": True, "workers": len(workers),
            "reply_channel": hub_ok}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request, redis: RedisDep, settings: SettingsDep) -> Response:
    """Prometheus metrics of this API process plus cluster state read from Redis now."""
    collected: Metrics = request.app.state.metrics
    await collected.cluster.refresh(redis, settings.queue_name, request.app.state.hub.in_flight)
    return Response(generate_latest(collected.registry), media_type=CONTENT_TYPE_LATEST)
