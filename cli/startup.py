"""Start-up checks: a configuration problem is one line saying what to set, never a traceback.

Every command that needs settings, the catalog or Redis checks them before it starts anything
(`freeference serve` before its children), so a wrong variable ends the command at once with
exit status 2 and a sentence naming the variable, instead of a pydantic or redis-py traceback
from inside a child process.
"""

import asyncio
import sys
import time
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError
from redis.exceptions import RedisError

from settings import Settings, get_settings
from settings.catalog import CatalogError, load_catalog
from settings.redis_url import redis_client

EXIT_CONFIG = 2
_PREFIX = "FREEFERENCE_"


class StartupError(Exception):
    """A configuration problem; its message is the one line the user sees."""


def fail(error: StartupError) -> NoReturn:
    """Print the one line and exit with status 2."""
    print(f"freeference: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG)


def load_settings() -> Settings:
    """get_settings(), or a StartupError naming the variables that are wrong."""
    try:
        return get_settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = str(err["msg"]).removeprefix("Value error, ")
            field = "_".join(str(part) for part in err["loc"]).upper()
            # Model-level checks name their variables themselves.
            problems.append(f"{_PREFIX}{field}: {message}" if field else message)
        raise StartupError("configuration error: " + "; ".join(problems)) from None


def check_catalog(path: Path) -> None:
    """The catalog file reads and validates (the API and every worker load it at start)."""
    try:
        load_catalog(path)
    except CatalogError as exc:
        raise StartupError(f"{exc}. Set {_PREFIX}CATALOG to a readable catalog file "
                           "(unset: the shipped settings/default_catalog.yaml).") from None


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def check_redis(url: str, wait_s: float) -> None:
    """Redis answers PING at `url`, within `wait_s` (a store that is just starting gets that long)."""
    async def ping() -> str | None:
        deadline = time.monotonic() + wait_s
        last = ""
        while True:
            try:
                async with redis_client(url, socket_connect_timeout=2, socket_timeout=2) as redis:
                    await redis.ping()
                return None
            except (RedisError, OSError, ValueError) as exc:
                last = _reason(exc)
            if time.monotonic() >= deadline:
                return last
            await asyncio.sleep(0.25)

    reason = asyncio.run(ping())
    if reason is not None:
        raise StartupError(f"cannot reach Redis at {safe_url(url)} ({reason}). Start it, or set "
                           f"{_PREFIX}REDIS_URL to a reachable Redis 7+ or Valkey (unset, `freeference serve` "
                           "starts an embedded one).")


def _reason(exc: BaseException) -> str:
    # redis-py wraps the socket error; its message names the address and the errno text.
    text = str(exc).strip().rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
