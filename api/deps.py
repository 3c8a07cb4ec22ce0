"""Annotated dependencies shared by the routes."""

from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from api.auth import authenticate
from api.dispatch import Dispatcher
from api.keys import KeyRecord
from settings import Settings, get_settings
from settings.catalog import CatalogFile

SettingsDep = Annotated[Settings, Depends(get_settings)]


def _redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


def _dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


def _catalog(request: Request) -> CatalogFile:
    catalog: CatalogFile = request.app.state.catalog
    return catalog


async def _current_key(request: Request, settings: SettingsDep) -> KeyRecord:
    return await authenticate(request, settings)


RedisDep = Annotated[Redis, Depends(_redis)]
DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]
CatalogDep = Annotated[CatalogFile, Depends(_catalog)]
CurrentKey = Annotated[KeyRecord, Depends(_current_key)]
