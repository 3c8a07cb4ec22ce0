"""The demo key and the data directory of `freeference serve`.

A data directory holds the embedded store's files and the demo key, in a file beside them
(mode 0600), because Redis keeps only a key's hash and the key must be printed again at the
next start. So the demo key is minted once per data directory and printed at every start;
it is minted again only if its record is gone from the store or was revoked.
"""

import asyncio
import os
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.keys import create_key, lookup_key
from cli.embedded_redis import answers, host_port
from settings import Settings
from settings.config import DEFAULT_REDIS_URL
from settings.redis_url import redis_client

DEMO_KEY_FILE = "demo-key"


def key_file(data_dir: Path) -> Path:
    """Where a data directory keeps its demo key."""
    return data_dir / DEMO_KEY_FILE


def running_store_dir(host: str, port: int) -> Path | None:
    """The directory of the embedded store answering at host:port (CONFIG GET dir), if it says."""
    async def ask() -> Path | None:
        try:
            async with Redis(host=host, port=port, socket_timeout=2) as redis:
                reply = await redis.config_get("dir")
        except (RedisError, OSError):
            return None
        value = reply.get("dir")
        return Path(value) if value else None

    return asyncio.run(ask())


def data_dir_for(settings: Settings) -> Path:
    """The data directory the commands of this machine share: the running embedded store's own
    when that is the store in use, else FREEFERENCE_DATA_DIR (default $XDG_DATA_HOME/freeference)."""
    if settings.redis_url is None:
        host, port = host_port(DEFAULT_REDIS_URL)
        if answers(host, port):
            found = running_store_dir(host, port)
            if found is not None:
                return found
    return settings.effective_data_dir


async def _usable(redis: Redis, key: str) -> bool:
    record = await lookup_key(redis, key)
    return record is not None and not record.revoked


def read_demo_key(redis_url: str, data_dir: Path) -> str | None:
    """The data directory's demo key if the store still knows it (and it is not revoked)."""
    path = key_file(data_dir)
    if not path.is_file():
        return None
    key = path.read_text(encoding="utf-8").strip()

    async def check() -> bool:
        async with redis_client(redis_url) as redis:
            return await _usable(redis, key)

    return key if key and asyncio.run(check()) else None


def ensure_demo_key(redis_url: str, data_dir: Path) -> str:
    """The data directory's demo key (pro tier), minted if there is none or the store lost it."""
    found = read_demo_key(redis_url, data_dir)
    if found is not None:
        return found

    async def mint() -> str:
        async with redis_client(redis_url) as redis:
            key, _ = await create_key(redis, name="demo", tier="pro")
            return key

    key = asyncio.run(mint())
    data_dir.mkdir(parents=True, exist_ok=True)
    # Created 0600 from the start: the key never sits in a file others can read.
    fd = os.open(key_file(data_dir), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode through O_TRUNC
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key
