"""Worker start-up of the routing layer: shared health, key rotation, failover, catalog refresh."""

import asyncio
import contextlib

import httpx
from redis.asyncio import Redis

from router.catalog import RuntimeCatalog
from router.failover import FailoverExecutor, LocalLoad
from router.health import BreakerTuning, CommandSink, HealthStore
from router.hedge import HedgeTuning
from router.keys import KeyRotation
from router.policy import Tuning
from router.providers.openai_compat import BodyCaps, OpenAICompatProvider
from router.refresh import CatalogRefresher
from settings import Settings


def breaker_tuning(settings: Settings) -> BreakerTuning:
    """Breaker and key-ban numbers from settings."""
    return BreakerTuning(failure_threshold=settings.breaker_failure_threshold, cooldown_s=settings.breaker_cooldown_s,
                         max_cooldown_s=settings.breaker_max_cooldown_s, probe_ttl_s=settings.breaker_probe_ttl_s,
                         ewma_alpha=settings.latency_ewma_alpha, key_ban_s=settings.upstream_key_ban_s,
                         feature_mark_s=settings.feature_mark_s, learned_window_s=settings.learned_window_s)


def build_executor(redis: Redis, client: httpx.AsyncClient, settings: Settings, sink: CommandSink | None = None,
                   local: LocalLoad | None = None) -> FailoverExecutor:
    """The failover executor of one worker process, sharing health through `redis` (successes via `sink`).

    `local` says when this process itself is too slow to hedge, or to blame a provider for a timeout.
    """
    health = HealthStore(redis, breaker_tuning(settings), sink)
    caps = BodyCaps(error_bytes=settings.upstream_error_body_max_bytes, body_bytes=settings.upstream_body_max_bytes,
                    stream_bytes=settings.upstream_stream_max_bytes)
    return FailoverExecutor(OpenAICompatProvider(client, caps), KeyRotation(), health, Tuning.from_settings(settings),
                            hedging=hedge_tuning(settings), local=local)


def hedge_tuning(settings: Settings) -> HedgeTuning:
    """Hedged-first-token numbers from settings."""
    return HedgeTuning(enabled=settings.hedge_enabled, multiplier=settings.hedge_ttft_multiplier,
                       min_s=settings.hedge_min_s, max_s=settings.hedge_max_s, max_share=settings.hedge_max_share)


def start_refresher(redis: Redis, catalog: RuntimeCatalog, client: httpx.AsyncClient,
                    settings: Settings) -> "asyncio.Task[None]":
    """Run the catalog refresh / live-deployment publisher in the background."""
    refresher = CatalogRefresher(redis, catalog, client, HealthStore(redis, breaker_tuning(settings)),
                                 settings.live_deployments_publish_s)
    return asyncio.create_task(refresher.run_forever(), name="catalog-refresh")


async def stop_refresher(task: "asyncio.Task[None] | None") -> None:
    """Cancel the background refresh and wait for it to end."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
