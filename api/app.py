"""The FastAPI application: create_app() and its lifespan (Redis, reply hub, catalog)."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from api.admission import Gatekeeper
from api.background import BackgroundWrites
from api.backpressure import InflightLimitMiddleware, StreamLimiter
from api.dispatch import Dispatcher
from api.errors import install_error_handlers
from api.fastpath import DirectRoute
from api.gate import KeyGate
from api.live_catalog import follow
from api.metrics import Metrics, MetricsMiddleware
from api.middleware import EdgeMiddleware
from api.openapi_schema import install_openapi
from api.pool_load import PoolLoad
from api.relay import ReplyHub
from api.routes import admin, batches, chat, embeddings, files, health, messages, models, responses
from settings import Settings, get_settings
from settings.catalog import load_catalog
from settings.redis_url import redis_client

# Routes that run a completion job: served past FastAPI's routing (api/fastpath.py), counted
# against the in-flight limit, and admitted by the script that also checks the key.
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/messages")
# Every route that runs a job: counted against the in-flight limit, its key checked again by admission.
JOB_PATHS = (*COMPLETION_PATHS, "/v1/embeddings")

# Response headers a browser client may read (CORS hides all but a few by default).
CORS_EXPOSED_HEADERS = [
    "x-request-id", "x-freeference-model", "x-freeference-provider", "x-freeference-attempts",
    "x-freeference-intent", "x-freeference-intent-reason", "x-freeference-route", "retry-after", "retry-after-ms",
    *(f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset") for kind in ("requests", "tokens")),
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` overrides get_settings() for this app (tests)."""

    def current_settings() -> Settings:
        return settings or app.dependency_overrides.get(get_settings, get_settings)()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conf = current_settings()
        app.state.settings = conf
        app.state.catalog = load_catalog(conf.catalog)
        redis = redis_client(conf.effective_redis_url, health_check_interval=10,
                             socket_keepalive=True, retry_on_timeout=True)
        hub = ReplyHub(redis, process_id=uuid.uuid4().hex[:12])
        await hub.start()
        app.state.redis = redis
        app.state.hub = hub
        app.state.dispatcher = Dispatcher(redis, hub, conf)
        app.state.gatekeeper = Gatekeeper(redis, conf)
        app.state.key_gate = KeyGate(redis, conf)
        app.state.stream_limiter = StreamLimiter(redis, conf.max_streams_per_key)
        app.state.background = BackgroundWrites()
        # The worker pool's published load: a request no worker can take soon is refused at once.
        app.state.pool_load = PoolLoad(redis, conf.queue_name, conf.worker_load_publish_s, conf.pickup_timeout_s,
                                       process_id=hub.process_id)
        app.state.pool_load.start()
        # Models the workers' provider listings added become listed and pinnable here (api/live_catalog.py).
        follower = asyncio.create_task(follow(app, redis, app.state.catalog, conf.live_deployments_publish_s),
                                       name="live-catalog")
        try:
            yield
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await app.state.pool_load.stop()
            await app.state.background.drain(timeout_s=5)
            await hub.stop()
            await redis.aclose()

    app = FastAPI(title="Freeference", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI-compatible gateway that routes by intent and fails over.")
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    install_error_handlers(app)
    install_openapi(app)  # documents the real error answers (api/openapi_schema.py)
    conf = current_settings()
    # File uploads get their own limit (plus room for the multipart framing); the route checks the file itself.
    upload_limit = conf.batch_upload_max_bytes + 64 * 1024
    # Each add wraps the previous: metrics (outermost) see every answer, 413s and 503s included.
    # Innermost: the chat route served without FastAPI's routing layers (api/fastpath.py).
    app.add_middleware(DirectRoute, fastapi_app=app,
                       routes=[chat.completions_route(), responses.create_route(), messages.create_route()])
    app.add_middleware(InflightLimitMiddleware, max_inflight=conf.max_inflight_requests, paths=JOB_PATHS)
    app.add_middleware(EdgeMiddleware, max_body_bytes=conf.max_body_bytes, body_timeout_s=conf.http_body_timeout_s,
                       body_min_bytes_per_s=conf.http_body_min_bytes_per_s,
                       max_open_bodies_per_key=conf.http_max_open_bodies_per_key,
                       path_limits={"/v1/files": upload_limit},
                       # Their admission script checks the key again itself (api/gate.py).
                       admitted_paths=JOB_PATHS)
    app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if conf.cors_origins:
        # Outermost, so a preflight is answered before the key check (browsers send it without
        # the Authorization header). Off by default: then no middleware at all on the hot path.
        app.add_middleware(CORSMiddleware, allow_origins=conf.cors_origins, allow_credentials=True,
                           allow_methods=["GET", "POST", "PATCH", "DELETE"], allow_headers=["*"],
                           expose_headers=CORS_EXPOSED_HEADERS, max_age=600)
    app.include_router(health.router)
    app.include_router(chat.router)
    app.include_router(responses.router)
    app.include_router(messages.router)
    app.include_router(embeddings.router)
    app.include_router(models.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(admin.router)
    return app
