"""The API's catalog follows what the workers route: models their providers' listings added, and
windows and features as the listings corrected them.

Workers publish a card per deployment they can route (LIVE_MODEL_CARDS_KEY, beside the live
deployments). Every publish period this process reads them once and, when they differ from what
it holds, replaces app.state.catalog with the catalog file plus the discovered models (and the
file's models as corrected): `GET /v1/models` lists them for pro keys and they can be pinned like
any exact model, with no read on the request path. Cards older than three periods are ignored,
like the deployments they describe; when Redis cannot be read the catalog stays as it was.
"""

import asyncio
import logging
import time

from fastapi import FastAPI
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from settings.catalog import CatalogFile, ModelConfig
from settings.logfields import STORE_DOWN
from workers.protocol import LIVE_DEPLOYMENTS_KEY, LIVE_MODEL_CARDS_KEY, LiveDeployment, ModelCard

log = logging.getLogger("freeference.api")


async def live_catalog(redis: Redis, file: CatalogFile, publish_every_s: float) -> CatalogFile:
    """The catalog file as the workers route it now (see the module docstring)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(LIVE_DEPLOYMENTS_KEY)
        pipe.hgetall(LIVE_MODEL_CARDS_KEY)
        deployments, cards = await pipe.execute()
    fresh_after_ms = int(time.time() * 1000 - 3 * publish_every_s * 1000)
    routed: dict[tuple[str, str], ModelCard] = {}
    for key, raw in deployments.items():
        try:
            entry = LiveDeployment.model_validate_json(raw)
            card = ModelCard.model_validate_json(cards[key]) if key in cards else None
        except ValidationError:
            continue  # a worker of another release: its deployments are listed from the file only
        if card is not None and entry.seen_ms >= fresh_after_ms:
            routed[(entry.model, entry.provider)] = card
    models = [_corrected(m, routed.get((m.id, m.provider))) for m in file.models]
    in_file = {(m.id, m.provider) for m in file.models}
    for (model_id, provider), card in sorted(routed.items()):
        if card.discovered and (model_id, provider) not in in_file and model_id not in file.capabilities:
            models.append(ModelConfig.model_validate({
                "id": model_id, "provider": provider, "upstream_name": model_id, "name": card.name,
                "context_window": card.context_window, "capabilities": card.capabilities, "lacks": card.lacks,
                "scores": card.scores, "created": card.created}))
    return file.model_copy(update={"models": models})


def _corrected(model: ModelConfig, card: ModelCard | None) -> ModelConfig:
    if card is None or card.discovered:
        return model
    return model.model_copy(update={"context_window": card.context_window, "capabilities": card.capabilities,
                                    "lacks": card.lacks})


async def follow(app: FastAPI, redis: Redis, file: CatalogFile, publish_every_s: float) -> None:
    """Keep app.state.catalog in step with what the workers publish, until cancelled."""
    while True:
        try:
            current = await live_catalog(redis, file, publish_every_s)
        except (RedisError, OSError) as exc:
            log.warning("live catalog not read (%s): listing the catalog file", type(exc).__name__,
                        extra=STORE_DOWN)
        else:
            if current != app.state.catalog:
                added = len(current.models) - len(file.models)
                app.state.catalog = current
                log.info("catalog follows the workers: %d models the file does not list", added)
        await asyncio.sleep(publish_every_s)
