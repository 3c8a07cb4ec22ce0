"""Breaker math, key state and ranking over the shared health hashes (fakeredis with Lua)."""

import asyncio
from collections.abc import AsyncIterator

import fakeredis
import pytest

from router.catalog import Deployment, RuntimeCatalog
from router.health import BreakerTuning, HealthSnapshot, HealthStore, KeyState, key_fingerprint, now_ms
from router.keys import KeyRotation, NoUsableKey
from router.providers.limits import parse_reset_s, read
from router.select import NoneAvailable, NothingFits, rank
from settings.catalog import CatalogFile
from workers.protocol import DeploymentHealth, deployment_health_key

TUNING = BreakerTuning(failure_threshold=3, cooldown_s=1.0, max_cooldown_s=4.0, probe_ttl_s=30, ewma_alpha=0.5,
                       key_ban_s=60)


def _catalog() -> RuntimeCatalog:
    file = CatalogFile.model_validate({
        "providers": [{"id": "p1", "base_url": "http://127.0.0.1:1/v1", "api_keys_env": ["K1", "K2"]},
                      {"id": "p2", "base_url": "http://127.0.0.1:2/v1", "requires_key": False}],
        "models": [
            {"id": "best", "provider": "p1", "upstream_name": "best", "context_window": 8000,
             "scores": {"general": 0.9}},
            {"id": "twin", "provider": "p2", "upstream_name": "twin", "context_window": 32000,
             "scores": {"general": 0.9}},
            {"id": "backup", "provider": "p2", "upstream_name": "backup", "context_window": 64000,
             "scores": {"general": 0.7}},
        ],
        "capabilities": {"text-basic": {"name": "General", "intent": "general"}},
    })
    return RuntimeCatalog.build(file, {"K1": "key-one", "K2": "key-two"})


@pytest.fixture
async def store() -> AsyncIterator[HealthStore]:
    redis = fakeredis.FakeAsyncRedis()
    yield HealthStore(redis, TUNING)
    await redis.aclose()


@pytest.fixture
def deployments() -> dict[str, Deployment]:
    return {d.model.id: d for d in _catalog().deployments}


async def _health(store: HealthStore, d: Deployment) -> DeploymentHealth:
    return (await store.snapshot([d])).of(d)


async def test_breaker_opens_after_threshold_consecutive_failures(store: HealthStore,
                                                                  deployments: dict[str, Deployment]) -> None:
    d = deployments["best"]
    assert not await store.record_failure(d)
    assert not await store.record_failure(d)
    before = now_ms()
    assert await store.record_failure(d)
    health = await _health(store, d)
    assert health.state(now_ms()) == "open"
    # Open for the cooldown less up to a fifth (jitter, so breakers opened together lapse apart).
    assert before + 800 <= health.open_until_ms <= now_ms() + 1000
    assert health.cooldown_ms == 1000
    # More failures while open (requests that started earlier) do not extend it.
    assert not await store.record_failure(d)
    assert (await _health(store, d)).open_until_ms == health.open_until_ms


async def test_success_resets_the_failure_count(store: HealthStore, deployments: dict[str, Deployment]) -> None:
    d = deployments["best"]
    await store.record_failure(d)
    await store.record_failure(d)
    await store.record_success(d, 100.0, None, None)
    assert not await store.record_failure(d)
    assert (await _health(store, d)).state(now_ms()) == "closed"


async def test_half_open_probe_is_claimed_once_and_failed_probes_double_the_cooldown(
        store: HealthStore, deployments: dict[str, Deployment]) -> None:
    d = deployments["best"]
    redis = store._redis
    cooldowns = []
    # An open breaker whose cooldown (1 s) has lapsed.
    await redis.hset(deployment_health_key(d.key), mapping={"fails": 5, "open_until_ms": 1, "cooldown_ms": 1000})  # type: ignore[misc]
    assert (await _health(store, d)).state(now_ms()) == "half_open"
    for _ in range(4):
        claims = await asyncio.gather(*(store.claim_probe(d) for _ in range(5)))
        assert claims.count(True) == 1  # exactly one worker probes
        assert await store.record_failure(d)  # the probe failed: reopen
        health = await _health(store, d)
        cooldowns.append(health.cooldown_ms)
        assert health.state(now_ms()) == "open"
        # Let it lapse again.
        await redis.hset(deployment_health_key(d.key), "open_until_ms", 1)  # type: ignore[misc]
    assert cooldowns == [2000, 4000, 4000, 4000]  # doubles, capped at max_cooldown_s
    assert await store.claim_probe(d)
    await store.record_success(d, 50.0, None, None)
    health = await _health(store, d)
    assert health.state(now_ms()) == "closed"
    assert (health.fails, health.open_until_ms, health.cooldown_ms) == (0, 0, 0)
    assert await store.claim_probe(d)  # success released the claim


async def test_latency_ewma(store: HealthStore, deployments: dict[str, Deployment]) -> None:
    d = deployments["twin"]
    await store.record_success(d, 100.0, None, None)
    assert (await _health(store, d)).ewma_ms == 100.0
    await store.record_success(d, 300.0, None, None)
    assert (await _health(store, d)).ewma_ms == pytest.approx(200.0)
    await store.record_success(d, None, None, None)  # no measurement leaves it alone
    assert (await _health(store, d)).ewma_ms == pytest.approx(200.0)


async def test_cooling_from_retry_after(store: HealthStore, deployments: dict[str, Deployment]) -> None:
    d = deployments["twin"]
    await store.cool(d, 30)
    health = await _health(store, d)
    assert health.state(now_ms()) == "cooling"
    assert 29_000 < health.blocked_for_ms(now_ms()) <= 30_000


async def test_banned_and_exhausted_keys_leave_rotation(store: HealthStore,
                                                        deployments: dict[str, Deployment]) -> None:
    d = deployments["best"]
    rotation = KeyRotation()
    snap = await store.snapshot([d])
    assert {rotation.pick(d, snap) for _ in range(4)} == {"key-one", "key-two"}
    await store.ban_key(d, "key-one")
    snap = await store.snapshot([d])
    assert {rotation.pick(d, snap) for _ in range(4)} == {"key-two"}
    quota = read({"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-requests": "30",
                  "x-ratelimit-reset-requests": "1m30s"}, "openai")
    await store.record_success(d, 10.0, quota, "key-two")
    snap = await store.snapshot([d])
    assert snap.key("p1", "key-two").blocked_until_ms("best") > now_ms() + 80_000
    with pytest.raises(NoUsableKey):
        rotation.pick(d, snap)
    # The request budget comes back with a later response that reports quota again.
    fresh = read({"x-ratelimit-remaining-requests": "29", "x-ratelimit-limit-requests": "30"}, "openai")
    await store.record_success(d, 10.0, fresh, "key-two")
    snap = await store.snapshot([d])
    assert rotation.pick(d, snap) == "key-two"
    assert snap.headroom(d) == pytest.approx(29 / 30)


def test_key_state_never_names_the_key() -> None:
    assert "key-one" not in key_fingerprint("key-one")
    assert KeyState(banned_until_ms=10).usable(11)
    assert not KeyState(exhausted_until_ms=10).usable(9)


@pytest.mark.parametrize(("value", "seconds"), [("7.66s", 7.66), ("2m59.5s", 179.5), ("1h2m", 3720.0),
                                                ("250ms", 0.25), ("12", 12.0), ("soon", None)])
def test_parse_reset(value: str, seconds: float | None) -> None:
    parsed = parse_reset_s(value)
    assert parsed == (pytest.approx(seconds) if seconds is not None else None)


def test_rank_orders_by_score_then_health_and_skips_what_does_not_fit(deployments: dict[str, Deployment]) -> None:
    best, twin, backup = deployments["best"], deployments["twin"], deployments["backup"]
    now = now_ms()
    snap = HealthSnapshot(at_ms=now)
    assert rank([[best, twin, backup]], "general", snap, 100).candidates == [best, twin, backup]
    # Equal scores: the faster one first; a slower equal is still before a lower score.
    snap.deployments[best.key] = DeploymentHealth(ewma_ms=2000)
    snap.deployments[twin.key] = DeploymentHealth(ewma_ms=100)
    assert rank([[best, twin, backup]], "general", snap, 100).candidates == [twin, best, backup]
    # A half-open breaker goes after a closed one of the same score; an open one is skipped.
    snap.deployments[best.key] = DeploymentHealth(open_until_ms=now - 1, cooldown_ms=1000)
    snap.deployments[twin.key] = DeploymentHealth(open_until_ms=now + 5000, cooldown_ms=5000)
    assert rank([[best, twin, backup]], "general", snap, 100).candidates == [best, backup]
    # Too long for the 8k and 32k windows: only the 64k model remains.
    assert rank([[best, twin, backup]], "general", HealthSnapshot(at_ms=now), 40_000).candidates == [backup]
    with pytest.raises(NothingFits):
        rank([[best, twin, backup]], "general", HealthSnapshot(at_ms=now), 100_000)


def test_rank_keeps_fallback_groups_in_order(deployments: dict[str, Deployment]) -> None:
    best, backup = deployments["best"], deployments["backup"]
    assert rank([[backup], [best]], "general", HealthSnapshot(at_ms=now_ms()), 10).candidates == [backup, best]


def test_everything_cooling_is_none_available_with_the_soonest_retry(deployments: dict[str, Deployment]) -> None:
    now = now_ms()
    snap = HealthSnapshot(at_ms=now)
    for d, wait_ms in zip(deployments.values(), (9000, 4000, 30000), strict=True):
        snap.deployments[d.key] = DeploymentHealth(cooling_until_ms=now + wait_ms)
    with pytest.raises(NoneAvailable) as info:
        rank([list(deployments.values())], "general", snap, 10)
    assert info.value.retry_after_s == pytest.approx(4.0)


async def test_stale_failures_do_not_extend_a_lapsed_breaker(store: HealthStore,
                                                             deployments: dict[str, Deployment]) -> None:
    # Requests that started before the breaker opened may fail after it lapsed; only the probe's
    # failure may reopen it for twice as long.
    d = deployments["best"]
    for _ in range(3):
        await store.record_failure(d)
    await asyncio.sleep(TUNING.cooldown_s + 0.05)  # the breaker lapses: half-open
    assert not await store.record_failure(d, probe=False)
    assert (await _health(store, d)).state(now_ms()) == "half_open"
    assert await store.record_failure(d, probe=True)
    health = await _health(store, d)
    assert health.state(now_ms()) == "open"
    assert health.cooldown_ms == int(TUNING.cooldown_s * 2000)


def test_a_health_hash_is_read_field_by_field() -> None:
    from router.keyspace import _HEALTH_FIELDS

    raw = {b"fails": b"2", b"ewma_ms": b"12.5", b"gone": b"1", b"window_tokens": b"4096", b"nf:tools": b"99",
           b"written_by_hand": b"x", b"cooldown_ms": b"oops"}
    health = DeploymentHealth.from_hash(raw)
    assert (health.fails, health.ewma_ms, health.gone, health.window_tokens) == (2, 12.5, True, 4096)
    assert health.unsupported == {"tools": 99} and health.cooldown_ms == 0  # unreadable: its default
    assert set(_HEALTH_FIELDS) == set(DeploymentHealth.model_fields) - {"unsupported"}  # every field is read
