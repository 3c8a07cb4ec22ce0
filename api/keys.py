"""API keys: generation, hashing and the Redis store (only sha256 hashes are stored)."""

import hashlib
import secrets
import time
from typing import Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from workers.protocol import API_KEY_INDEX, Tier, api_key_record_key

KEY_PREFIX = "ff-"


class KeyLimits(BaseModel):
    """Per-key overrides; None means the tier default."""

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    rpd: int | None = Field(default=None, ge=1)


class KeyRecord(BaseModel):
    id: str
    name: str
    tier: Tier
    created: int
    revoked: bool = False
    limits: KeyLimits = KeyLimits()
    # "master" is the settings master key, never stored in Redis.
    kind: Literal["user", "master"] = "user"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _id_index_key(key_id: str) -> str:
    return f"ff:apikey-id:{key_id}"


async def create_key(redis: Redis, *, name: str, tier: Tier, limits: KeyLimits | None = None) -> tuple[str, KeyRecord]:
    """Create a key; returns (plaintext key — shown once, record)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(key)
    record = KeyRecord(
        id="key_" + secrets.token_hex(8), name=name, tier=tier, created=int(time.time()), limits=limits or KeyLimits()
    )
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(api_key_record_key(digest), record.model_dump_json())
        pipe.set(_id_index_key(record.id), digest)
        pipe.sadd(API_KEY_INDEX, digest)
        await pipe.execute()
    return key, record


async def lookup_key(redis: Redis, key: str) -> KeyRecord | None:
    """The record for a plaintext key, or None. Lookup is by hash, so timing reveals nothing."""
    raw = await redis.get(api_key_record_key(hash_key(key)))
    return KeyRecord.model_validate_json(raw) if raw else None


async def list_keys(redis: Redis) -> list[KeyRecord]:
    digests: set[bytes] = await redis.smembers(API_KEY_INDEX)  # type: ignore[misc]
    if not digests:
        return []
    raws = await redis.mget([api_key_record_key(d.decode() if isinstance(d, bytes) else d) for d in digests])
    records = [KeyRecord.model_validate_json(r) for r in raws if r]
    return sorted(records, key=lambda r: r.created)


async def _digest_for(redis: Redis, key_or_id: str) -> str | None:
    if key_or_id.startswith(KEY_PREFIX):
        return hash_key(key_or_id)
    raw = await redis.get(_id_index_key(key_or_id))
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def revoke_key(redis: Redis, key_or_id: str) -> KeyRecord | None:
    """Mark a key revoked; takes effect on the next request on every replica (no caching)."""
    digest = await _digest_for(redis, key_or_id)
    if digest is None:
        return None
    raw = await redis.get(api_key_record_key(digest))
    if raw is None:
        return None
    record = KeyRecord.model_validate_json(raw).model_copy(update={"revoked": True})
    await redis.set(api_key_record_key(digest), record.model_dump_json())
    return record
