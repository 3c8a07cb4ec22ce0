"""`freeference providers check`: what each provider and key of the catalog can do right now.

Run on day one with the keys exported: per provider and key, whether the provider answers,
whether the key is valid, what it lists against the catalog (new / vanished / windows that
changed) and, when a gateway has been running on this Redis, each key's last known quota and
when it resets. Keys are shown by fingerprint only. Exit status 1 when an enabled provider has
no key that works (or none is enabled).
"""

import argparse
import asyncio
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from redis.exceptions import RedisError

from router.catalog import RuntimeCatalog
from router.health import key_fingerprint
from router.refresh import check_provider
from settings import get_settings
from settings.catalog import load_catalog
from settings.redis_url import redis_client
from workers.protocol import ProviderStatus, key_quota_view, upstream_key_state_key

_REDIS_TIMEOUT_S = 1.0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `providers check`."""
    providers = subparsers.add_parser("providers", help="check the catalog's providers and keys")
    actions = providers.add_subparsers(dest="providers_action", required=True)
    check = actions.add_parser("check", help="per provider and key: reachable, key valid, models, quota")
    check.add_argument("--json", action="store_true", help="one JSON object per provider")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args.json))


async def _run(as_json: bool) -> int:
    settings = get_settings()
    catalog = RuntimeCatalog.build(load_catalog(settings.catalog), os.environ)
    quota = await _known_quota(catalog, settings.effective_redis_url)
    statuses: list[ProviderStatus] = [ProviderStatus(provider=pid, enabled=False, reason=why)
                                      for pid, why in catalog.skipped.items()]
    async with httpx.AsyncClient(follow_redirects=False) as client:
        checked = await asyncio.gather(*(check_provider(client, p, catalog.file) for p in catalog.providers.values()))
    statuses += [status for status, _ in checked]
    statuses.sort(key=lambda s: [p.id for p in catalog.file.providers].index(s.provider))
    for status in statuses:
        if as_json:
            print(json.dumps({**status.model_dump(), "quota": {k.fingerprint: quota.get((status.provider,
                                                                                          k.fingerprint))
                                                               for k in status.keys}}))
        else:
            print(_describe(status, quota))
    working = [s for s in statuses if s.enabled and any(k.valid for k in s.keys)]
    broken = [s for s in statuses if s.enabled and not any(k.valid for k in s.keys)]
    if not as_json:
        print(f"\n{len(working)} provider(s) ready, {len(broken)} not working, "
              f"{sum(not s.enabled for s in statuses)} skipped (no key in the environment).")
    return 1 if broken or not working else 0


async def _known_quota(catalog: RuntimeCatalog, redis_url: str) -> dict[tuple[str, str], dict[str, Any] | None]:
    """(provider, key fingerprint) → what the gateway's workers last learned of that key (none: no Redis)."""
    ids = [(p.id, key_fingerprint(k)) for p in catalog.providers.values() for k in p.api_keys]
    if not ids:
        return {}
    redis = redis_client(redis_url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for provider, fingerprint in ids:
                pipe.hgetall(upstream_key_state_key(provider, fingerprint))
            replies = await pipe.execute()
    except (RedisError, OSError, TimeoutError):  # no gateway running here: quota unknown, not an error
        return {}
    finally:
        await redis.aclose()
    now_ms = int(time.time() * 1000)
    return {key_id: key_quota_view(raw, now_ms) for key_id, raw in zip(ids, replies, strict=True)}


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def _describe(status: ProviderStatus, quota: dict[tuple[str, str], dict[str, Any] | None]) -> str:
    if not status.enabled:
        return f"{status.provider}: skipped ({status.reason})"
    lines = [f"{status.provider}:"]
    for key in status.keys:
        name = "no key" if key.fingerprint == "-" else f"key {key.fingerprint[:8]}…"
        if not key.reachable:
            state = f"unreachable ({key.detail})"
        elif key.valid is False:
            state = f"KEY REFUSED (HTTP {key.status}: {key.detail})"
        elif key.listed is None:
            state = f"reachable, no model listing (HTTP {key.status} {key.detail})".rstrip()
        else:
            state = f"reachable, key valid, {key.listed} models listed"
        lines.append(f"  {name}: {state}")
        known = quota.get((status.provider, key.fingerprint))
        if known:
            lines.append(f"    quota: {_quota_text(known)}")
    if status.listed is not None:
        lines.append(f"  catalog: {status.configured} configured; {len(status.vanished)} vanished"
                     + (f" ({', '.join(status.vanished)})" if status.vanished else "")
                     + f"; {len(status.context_changed)} windows differ"
                     + "".join(f"\n    {m}: catalog {old}, listed {new}" for m, (old, new)
                               in status.context_changed.items()))
        if status.new:
            lines.append(f"  listed but not in the catalog: {', '.join(status.new[:10])}"
                         + (" …" if len(status.new) > 10 else "")
                         + (f" ({len(status.added)} routed by discovery)" if status.added else ""))
    return "\n".join(lines)


def _quota_text(view: dict[str, Any]) -> str:
    parts = []
    if "remaining_requests" in view:
        limit = f"/{view['limit_requests']}" if "limit_requests" in view else ""
        parts.append(f"{view['remaining_requests']}{limit} requests left")
    if "parked_until_ms" in view:
        parts.append(f"exhausted until {_when(view['parked_until_ms'])}")
    if "banned_until_ms" in view:
        parts.append(f"refused, out of rotation until {_when(view['banned_until_ms'])}")
    for model, until in (view.get("models_parked_until_ms") or {}).items():
        parts.append(f"{model} exhausted until {_when(until)}")
    return "; ".join(parts) or "nothing known"
