"""/admin/keys, /admin/usage and /admin/providers: key management, usage and provider state, master key only.

Keys are named by id in every path (a plaintext key in a URL ends up in access logs); the key
itself is returned once, by the create call.
"""

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.auth import require_master
from api.deps import RedisDep, SettingsDep
from api.errors import OpenAIError, invalid_request
from api.ids import KEY_ID, quoted, well_formed
from api.keys import (
    KEY_PREFIX,
    EffectiveLimits,
    KeyLimits,
    KeyRecord,
    create_key,
    effective_limits,
    get_key,
    list_keys,
    update_key,
)
from api.usage import KeyUsage, read_usage
from settings import Settings
from workers.protocol import PROVIDER_STATUS_KEY, ProviderStatus, Tier, key_quota_view, upstream_key_state_key


async def _master_only(request: Request, settings: SettingsDep) -> None:
    await require_master(request, settings)


router = APIRouter(prefix="/admin", dependencies=[Depends(_master_only)])

Days = Annotated[int, Query(ge=1, le=366)]


class KeyView(KeyRecord):
    """A key's record as admins see it: with the limits it actually gets."""

    effective_limits: EffectiveLimits


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    tier: Tier = "free"
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    rpd: int | None = Field(default=None, ge=1)
    batch_lines: int | None = Field(default=None, ge=1)


class UpdateKey(BaseModel):
    """Fields left out stay as they are; a limit set to null goes back to the tier default."""

    model_config = ConfigDict(extra="forbid")

    tier: Tier | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    rpd: int | None = Field(default=None, ge=1)
    batch_lines: int | None = Field(default=None, ge=1)


def _view(record: KeyRecord, settings: Settings) -> KeyView:
    return KeyView(**record.model_dump(), effective_limits=effective_limits(record, settings))


def _key_not_found(key_id: str) -> OpenAIError:
    return OpenAIError(404, f"No API key with id{quoted(key_id)}.", code="key_not_found", param="key_id")


def _checked_id(key_id: str) -> str:
    if key_id.startswith(KEY_PREFIX):
        raise invalid_request("Name keys by their id (key_…), never by the key itself in a URL.", param="key_id")
    if not well_formed(KEY_ID, key_id):
        raise _key_not_found(key_id)  # before its id names a Redis key (api/ids.py)
    return key_id


@router.post("/keys", status_code=201)
async def create(body: CreateKey, redis: RedisDep, settings: SettingsDep) -> JSONResponse:
    """Create a key; the response is the only time the key itself is shown."""
    key, record = await create_key(redis, name=body.name, tier=body.tier,
                                   limits=KeyLimits(rpm=body.rpm, tpm=body.tpm, rpd=body.rpd,
                                                    batch_lines=body.batch_lines))
    return JSONResponse({"key": key, **_view(record, settings).model_dump()}, status_code=201)


@router.get("/keys")
async def list_all(redis: RedisDep, settings: SettingsDep) -> dict[str, Any]:
    """Every key (never the key itself), oldest first."""
    return {"object": "list", "data": [_view(r, settings).model_dump() for r in await list_keys(redis)]}


@router.get("/keys/{key_id}")
async def show(key_id: str, redis: RedisDep, settings: SettingsDep) -> KeyView:
    """One key's record and effective limits."""
    record = await get_key(redis, _checked_id(key_id))
    if record is None:
        raise _key_not_found(key_id)
    return _view(record, settings)


@router.patch("/keys/{key_id}")
async def update(key_id: str, body: UpdateKey, redis: RedisDep, settings: SettingsDep) -> KeyView:
    """Change a key's tier or limits; effective from its next request on every replica."""
    given = body.model_dump(include=body.model_fields_set & {"rpm", "tpm", "rpd", "batch_lines"})
    record = await update_key(redis, _checked_id(key_id), tier=body.tier, limit_changes=given)
    if record is None:
        raise _key_not_found(key_id)
    return _view(record, settings)


@router.post("/keys/{key_id}/revoke")
async def revoke(key_id: str, redis: RedisDep, settings: SettingsDep) -> KeyView:
    """Revoke a key; its next request on any replica gets 401. The record stays for usage."""
    record = await update_key(redis, _checked_id(key_id), revoked=True)
    if record is None:
        raise _key_not_found(key_id)
    return _view(record, settings)


@router.get("/keys/{key_id}/usage")
async def key_usage(key_id: str, redis: RedisDep, days: Days = 7) -> KeyUsage:
    """One key's usage per UTC day and model over the last `days` days."""
    if await get_key(redis, _checked_id(key_id)) is None:
        raise _key_not_found(key_id)
    return (await read_usage(redis, [key_id], days))[0]


@router.get("/usage")
async def all_usage(redis: RedisDep, days: Days = 1) -> dict[str, Any]:
    """Every key's usage over the last `days` UTC days."""
    ids = [r.id for r in await list_keys(redis)]
    return {"object": "list", "data": [u.model_dump() for u in await read_usage(redis, ids, days)]}


@router.get("/providers")
async def providers(redis: RedisDep) -> dict[str, Any]:
    """Each provider as the workers last checked it: keys (by fingerprint), listing vs catalog, quota."""
    raw = await redis.hgetall(PROVIDER_STATUS_KEY)  # type: ignore[misc]
    statuses = sorted((ProviderStatus.model_validate_json(v) for v in raw.values()), key=lambda s: s.provider)
    key_ids = [(s.provider, k.fingerprint) for s in statuses for k in s.keys if k.fingerprint != "-"]
    async with redis.pipeline(transaction=False) as pipe:
        for provider, fingerprint in key_ids:
            pipe.hgetall(upstream_key_state_key(provider, fingerprint))
        states = dict(zip(key_ids, await pipe.execute(), strict=True))
    now_ms = int(time.time() * 1000)
    data = []
    for status in statuses:
        view = status.model_dump()
        for key in view["keys"]:
            key["quota"] = key_quota_view(states.get((status.provider, key["fingerprint"])) or {}, now_ms)
        data.append(view)
    return {"object": "list", "data": data}

