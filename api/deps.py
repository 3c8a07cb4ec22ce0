"""Annotated dependencies shared by the routes."""

from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from api.auth import authenticate
from api.dispatch import Dispatcher
from api.keys import KeyRecord
from settings import Settings
from settings.catalog import CatalogFile

# Every dependency here is `async def`: FastAPI runs plain `def` dependencies in a thread pool,
# which cost three thread hand-offs per request (docs/performance.md).


async def current_settings(request: Request) -> Settings:
    """The app's settings, resolved once in its lifespan (get_settings() or its override)."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(current_settings)]


async def _redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


async def _dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


async def _catalog(request: Request) -> CatalogFile:
    catalog: CatalogFile = request.app.state.catalog
    return catalog


async def _current_key(request: Request, settings: SettingsDep) -> KeyRecord:
    return await authenticate(request, settings)


RedisDep = Annotated[Redis, Depends(_redis)]
DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]
CatalogDep = Annotated[CatalogFile, Depends(_catalog)]
CurrentKey = Annotated[KeyRecord, Depends(_current_key)]
