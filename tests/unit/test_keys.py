"""Key store, admission script and usage recording against the session's private Valkey."""

import hmac
import time
from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from api.admission import Admission, Gatekeeper, estimate_prompt_tokens
from api.auth import is_master_key
from api.errors import OpenAIError
from api.keys import (
    KeyLimits,
    KeyRecord,
    create_key,
    effective_limits,
    get_key,
    hash_key,
    list_keys,
    lookup_key,
    update_key,
)
from api.usage import UsageRecorder, read_usage
from settings import Settings
from workers.protocol import DoneEvent, RouteInfo

T0 = 1_800_000_030.0  # mid-window, as in test_ratelimit


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url.rsplit("/", 1)[0] + "/0")
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def settings() -> Settings:
    return Settings(free_rpm=3, free_tpm=1000, free_rpd=100, pro_rpm=50, pro_tpm=50_000, pro_rpd=1000,
                    master_key=SecretStr("m" * 24))


async def _all_redis_bytes(redis: Redis) -> bytes:
    """Every key name and every value in the database, concatenated."""
    out = b""
    async for name in redis.scan_iter():
        out += name
        kind = (await redis.type(name)).decode()
        if kind == "string":
            out += await redis.get(name) or b""
        elif kind == "set":
            out += b"".join(await redis.smembers(name))  # type: ignore[misc]
        elif kind == "hash":
            out += b"".join(k + v for k, v in (await redis.hgetall(name)).items())  # type: ignore[misc]
    return out


async def test_only_the_hash_is_stored(redis: Redis) -> None:
    key, record = await create_key(redis, name="alice", tier="free")
    assert key.startswith("ff-") and len(key) > 40
    stored = await _all_redis_bytes(redis)
    assert key.encode() not in stored
    assert key[3:].encode() not in stored
    assert hash_key(key).encode() in stored
    assert (await lookup_key(redis, key)) == record
    assert await lookup_key(redis, key + "x") is None


async def test_get_update_and_revoke_by_id_or_key(redis: Redis) -> None:
    key, record = await create_key(redis, name="bob", tier="free", limits=KeyLimits(rpm=5))
    assert (await get_key(redis, key)) == (await get_key(redis, record.id))
    updated = await update_key(redis, record.id, tier="pro", limit_changes={"tpm": 900})
    assert updated is not None and updated.tier == "pro"
    assert updated.limits == KeyLimits(rpm=5, tpm=900)  # merged, not replaced
    reset = await update_key(redis, key, limit_changes={"rpm": None})
    assert reset is not None and reset.limits == KeyLimits(tpm=900)
    revoked = await update_key(redis, record.id, revoked=True)
    assert revoked is not None and revoked.revoked and revoked.limits == KeyLimits(tpm=900)
    assert await update_key(redis, "key_missing", revoked=True) is None
    assert [r.id for r in await list_keys(redis)] == [record.id]


def test_effective_limits_override_the_tier(settings: Settings) -> None:
    record = KeyRecord(id="k", name="n", tier="free", created=0, limits=KeyLimits(tpm=7))
    assert effective_limits(record, settings).model_dump() == {"rpm": 3, "tpm": 7, "rpd": 100, "batch_lines": 2000}


async def test_admission_resolves_tier_defaults_and_overrides(redis: Redis, settings: Settings) -> None:
    gate = Gatekeeper(redis, settings)
    free_key, free = await create_key(redis, name="f", tier="free")
    pro_key, _ = await create_key(redis, name="p", tier="pro", limits=KeyLimits(rpm=2))
    record, decision = await gate.admit(free_key, token_cost=100, now_s=T0)
    assert record == free and decision.allowed
    assert {s.limit.name: (s.limit.limit, s.remaining) for s in decision.states} == {
        "requests": (3, 2), "tokens": (1000, 900), "requests-day": (100, 99)}
    _, pro_decision = await gate.admit(pro_key, token_cost=1, now_s=T0)
    assert [s.limit.limit for s in pro_decision.states] == [2, 50_000, 1000]
    listed = {r.id: r for r in await list_keys(redis)}
    assert listed[free.id].last_used == int(T0)


async def test_admission_refuses_over_limit_without_charging(redis: Redis, settings: Settings) -> None:
    gate = Gatekeeper(redis, settings)
    key, _ = await create_key(redis, name="f", tier="free")
    for _ in range(3):
        assert (await gate.admit(key, token_cost=10, now_s=T0))[1].allowed
    _, refused = await gate.admit(key, token_cost=10, now_s=T0)
    assert not refused.allowed and refused.blocking is not None and refused.blocking.name == "requests"
    assert [s.remaining for s in refused.states] == [0, 970, 97]  # tokens and day not charged
    # A change of limits holds from the next request: no cache in between.
    await update_key(redis, key, limit_changes={"rpm": 10})
    assert (await gate.admit(key, token_cost=10, now_s=T0))[1].allowed


@pytest.mark.parametrize("revoke", [True, False])
async def test_admission_401_for_unknown_and_revoked(redis: Redis, settings: Settings, revoke: bool) -> None:
    gate = Gatekeeper(redis, settings)
    key, _ = await create_key(redis, name="f", tier="free")
    if revoke:
        await update_key(redis, key, revoked=True)
    else:
        key = key[:-1] + ("A" if key[-1] != "A" else "B")
    with pytest.raises(OpenAIError) as caught:
        await gate.admit(key, token_cost=1)
    assert caught.value.status == 401 and caught.value.body.code == "invalid_api_key"
    assert key not in caught.value.body.message


def test_master_key_uses_constant_time_comparison(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert is_master_key(settings, "m" * 24)
    assert not is_master_key(settings, "m" * 23)
    assert not is_master_key(settings, "m" * 24 + "x")
    assert len(compared) == 3
    assert not is_master_key(Settings(), "anything")


def test_estimate_is_bytes_over_four() -> None:
    assert estimate_prompt_tokens(b"") == 1
    assert estimate_prompt_tokens(b"x" * 401) == 101


async def _admitted(redis: Redis, settings: Settings, estimate: int) -> Admission:
    key, _ = await create_key(redis, name="u", tier="free")
    now = time.time()
    record, decision = await Gatekeeper(redis, settings).admit(key, token_cost=estimate, now_s=now)
    return Admission(record, decision, estimate, now)


async def test_usage_success_bills_usage_and_corrects_tokens(redis: Redis, settings: Settings) -> None:
    admission = await _admitted(redis, settings, 300)
    recorder = UsageRecorder(redis, admission, retention_days=1)

    route = RouteInfo(model="m1", provider="p", attempts=1)
    recorder.begin(None)
    await recorder.note("done", DoneEvent(route=route, usage={"prompt_tokens": 40, "completion_tokens": 10,
                                                              "total_tokens": 50}).model_dump_json().encode())
    assert recorder.recorded
    tokens_limit = admission.tokens_limit
    assert tokens_limit is not None
    assert int(await redis.get(tokens_limit.redis_key(admission.admitted_at_s))) == 50  # 300 estimated → 50 real
    [usage] = await read_usage(redis, [admission.key.id], days=1)
    assert usage.total.model_dump() == {"requests": 1, "prompt_tokens": 40, "completion_tokens": 10, "failures": 0}
    assert list(usage.days[0].models) == ["m1"]


async def test_usage_failure_counts_but_bills_no_tokens(redis: Redis, settings: Settings) -> None:
    admission = await _admitted(redis, settings, 200)
    recorder = UsageRecorder(redis, admission, retention_days=1)

    recorder.begin("code")
    await recorder.note("start", b'{"route": {"model": "m2", "provider": "p", "attempts": 1}}')
    await recorder.note("error", b'{"status": 502, "error": {"message": "x", "type": "upstream_error"}}')
    await recorder.failed()  # a second report of the same request is ignored
    await recorder.abandoned()  # and so is the caller leaving afterwards
    tokens_limit = admission.tokens_limit
    assert tokens_limit is not None
    assert int(await redis.get(tokens_limit.redis_key(admission.admitted_at_s))) == 0  # estimate refunded
    [usage] = await read_usage(redis, [admission.key.id], days=1)
    assert usage.days[0].models["m2"].model_dump() == {"requests": 1, "prompt_tokens": 0, "completion_tokens": 0,
                                                       "failures": 1}


async def test_usage_without_a_job_records_nothing(redis: Redis, settings: Settings) -> None:
    admission = await _admitted(redis, settings, 5)
    await UsageRecorder(redis, admission, retention_days=1).failed()
    [usage] = await read_usage(redis, [admission.key.id], days=1)
    assert usage.days == [] and usage.total.requests == 0

