"""API keys: generation, hashing and the Redis store (only sha256 hashes are stored).

A key's id is derived from its hash (`key_` + the first 16 hex digits), so the API can name a
key's rate-limit counters before it has read the record: auth and limits then take one Lua
call (api/admission.py). The full hash still decides: a record is found by the full sha256.
"""

import hashlib
import secrets
import time
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import WatchError

from settings import Settings
from workers.protocol import API_KEY_INDEX, API_KEY_LAST_USED, Tier, api_key_id_key, api_key_record_key

KEY_PREFIX = "ff-"
_ID_PREFIX = "key_"


class KeyLimits(BaseModel):
    """Per-key overrides; None means the tier default."""

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    rpd: int | None = Field(default=None, ge=1)
    batch_lines: int | None = Field(default=None, ge=1)  # lines queued in unfinished batches


class KeyRecord(BaseModel):
    id: str
    name: str
    tier: Tier
    created: int
    revoked: bool = False
    limits: KeyLimits = KeyLimits()
    # "master" is the settings master key, never stored in Redis.
    kind: Literal["user", "master"] = "user"
    # Unix seconds of the last request; kept apart from the record (API_KEY_LAST_USED) and
    # filled in only when a record is read for display.
    last_used: int | None = None

    def stored_json(self) -> str:
        """The JSON kept in Redis (without the display-only last_used)."""
        return self.model_dump_json(exclude={"last_used"})


class EffectiveLimits(BaseModel):
    """The limits a key actually gets: its own overrides, else its tier's defaults."""

    rpm: int
    tpm: int
    rpd: int
    batch_lines: int


def hash_key(key: str) -> str:
    """sha256 hex of a plaintext key; the only form in which keys are stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_for_digest(digest: str) -> str:
    """The public id of the key with this hash."""
    return _ID_PREFIX + digest[:16]


def effective_limits(record: KeyRecord, settings: Settings) -> EffectiveLimits:
    """Per-key overrides on top of the tier defaults (the admission script applies the same rule)."""
    rpm, tpm, rpd = settings.tier_limits(record.tier)
    own = record.limits
    return EffectiveLimits(rpm=own.rpm or rpm, tpm=own.tpm or tpm, rpd=own.rpd or rpd,
                           batch_lines=own.batch_lines or settings.tier_batch_queued_lines(record.tier))


async def create_key(redis: Redis, *, name: str, tier: Tier, limits: KeyLimits | None = None) -> tuple[str, KeyRecord]:
    """Create a key; returns (plaintext key — shown once, record)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(key)
    record = KeyRecord(id=key_id_for_digest(digest), name=name, tier=tier, created=int(time.time()),
                       limits=limits or KeyLimits())
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(api_key_record_key(digest), record.stored_json())
        pipe.set(api_key_id_key(record.id), digest)
        pipe.sadd(API_KEY_INDEX, digest)
        await pipe.execute()
    return key, record


async def lookup_key(redis: Redis, key: str) -> KeyRecord | None:
    """The record for a plaintext key, or None.

    No secret is compared here: the key is hashed and the hash is a Redis key name, so the
    time taken does not depend on how much of a guess matches a real key.
    """
    return await lookup_digest(redis, hash_key(key))


async def lookup_digest(redis: Redis, digest: str) -> KeyRecord | None:
    """The record of the key with this sha256 hex digest, or None."""
    raw = await redis.get(api_key_record_key(digest))
    return KeyRecord.model_validate_json(raw) if raw else None


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


async def _with_last_used(redis: Redis, records: list[KeyRecord]) -> list[KeyRecord]:
    if not records:
        return records
    seen = await redis.hmget(API_KEY_LAST_USED, [r.id for r in records])  # type: ignore[misc]
    return [r.model_copy(update={"last_used": int(_text(s)) if s else None}) for r, s in zip(records, seen,
                                                                                              strict=True)]


async def list_keys(redis: Redis) -> list[KeyRecord]:
    """Every key's record (never the key), oldest first, with last_used."""
    digests: set[bytes] = await redis.smembers(API_KEY_INDEX)  # type: ignore[misc]
    if not digests:
        return []
    raws = await redis.mget([api_key_record_key(_text(d)) for d in digests])
    records = sorted((KeyRecord.model_validate_json(r) for r in raws if r), key=lambda r: (r.created, r.id))
    return await _with_last_used(redis, records)


async def digest_for(redis: Redis, key_or_id: str) -> str | None:
    """The stored hash for a plaintext key or a key id; None if no such key exists."""
    if key_or_id.startswith(KEY_PREFIX):
        digest = hash_key(key_or_id)
        return digest if await redis.exists(api_key_record_key(digest)) else None
    raw = await redis.get(api_key_id_key(key_or_id))
    return None if raw is None else _text(raw)


def key_id_of(key_or_id: str) -> str:
    """A key id from a plaintext key or an id, without touching Redis (so a key never leaves)."""
    return key_id_for_digest(hash_key(key_or_id)) if key_or_id.startswith(KEY_PREFIX) else key_or_id


async def get_key(redis: Redis, key_or_id: str) -> KeyRecord | None:
    """One record by plaintext key or id, with last_used."""
    digest = await digest_for(redis, key_or_id)
    raw = None if digest is None else await redis.get(api_key_record_key(digest))
    if raw is None:
        return None
    return (await _with_last_used(redis, [KeyRecord.model_validate_json(raw)]))[0]


async def update_key(redis: Redis, key_or_id: str, *, tier: Tier | None = None,
                     limit_changes: Mapping[str, int | None] | None = None,
                     revoked: bool | None = None) -> KeyRecord | None:
    """Change tier, some limits (None = back to the tier default) or revocation; None if no such key.

    WATCH makes concurrent admin updates (a revoke racing a limit change) both stick.
    """
    digest = await digest_for(redis, key_or_id)
    if digest is None:
        return None
    record_key = api_key_record_key(digest)
    changes: dict[str, object] = {}
    if tier is not None:
        changes["tier"] = tier
    if revoked is not None:
        changes["revoked"] = revoked
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(record_key)
                raw = await pipe.get(record_key)
                if raw is None:
                    return None
                record = KeyRecord.model_validate_json(raw).model_copy(update=changes)
                if limit_changes:
                    merged = KeyLimits.model_validate({**record.limits.model_dump(), **limit_changes})
                    record = record.model_copy(update={"limits": merged})
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(record_key, record.stored_json())
                await pipe.execute()
                break
            except WatchError:
                continue
    return (await _with_last_used(redis, [record]))[0]


async def revoke_key(redis: Redis, key_or_id: str) -> KeyRecord | None:
    """Mark a key revoked; takes effect on the next request on every replica (no caching)."""
    return await update_key(redis, key_or_id, revoked=True)
