"""Redis URLs: plain `redis://` / `rediss://`, or Sentinel.

    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]

A Sentinel URL names the Sentinels (default port 26379) and the monitored service; clients
ask the Sentinels for the current primary on every (re)connection, so a failover looks to
every process like a Redis restart, which API and workers ride out by themselves. The user
and password are the data nodes' (Sentinels are reached without them).
"""

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis
import redis.sentinel
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel://"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """Where the Sentinels are and which primary to ask them for."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def sentinel_target(url: str) -> SentinelTarget | None:
    """Parse a redis+sentinel:// URL; None for any other URL. Raises ValueError if malformed."""
    if not url.startswith(SENTINEL_SCHEME):
        return None
    rest = url[len(SENTINEL_SCHEME):]
    credentials, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts or len(parts) > 2:
        raise ValueError("expected redis+sentinel://host:port[,host:port...]/service_name[/db]")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
        sentinels.append((name or host, int(port) if port else DEFAULT_SENTINEL_PORT))
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    return SentinelTarget(sentinels=sentinels, service=unquote(parts[0]), db=int(parts[1]) if len(parts) == 2 else 0,
                          username=unquote(username) or None, password=unquote(password) or None)


def redis_client(url: str, **kwargs: Any) -> Redis:
    """An asyncio client for a plain or Sentinel URL (kwargs go to the data-node connections)."""
    target = sentinel_target(url)
    if target is None:
        plain: Redis = Redis.from_url(url, **kwargs)
        return plain
    sentinel = Sentinel(target.sentinels, socket_timeout=kwargs.get("socket_timeout", 2.0))  # type: ignore[no-untyped-call]
    client: Redis = sentinel.master_for(target.service, redis_class=Redis, db=target.db, username=target.username,
                                        password=target.password, **kwargs)
    return client


def blocking_redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client for a plain or Sentinel URL, for a thread that must not wait on an event loop."""
    target = sentinel_target(url)
    if target is None:
        plain: redis.Redis = redis.Redis.from_url(url, **kwargs)
        return plain
    sentinel = redis.sentinel.Sentinel(target.sentinels,  # type: ignore[no-untyped-call]
                                       socket_timeout=kwargs.get("socket_timeout", 2.0))
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.service, db=target.db, username=target.username, password=target.password, **kwargs)
    return client
