"""The worker's upstream HTTP client: httpx's interface, aiohttp's wire.

httpx's own transport (httpcore + h11, pure Python) spent about 1.2 ms of CPU per streamed
16-token completion on this machine; the same call through httpx with `httpx-aiohttp`'s
transport (aiohttp's C HTTP parser) about 0.65 ms (bench numbers in docs/performance.md). It is
the transport the official OpenAI SDK offers as `DefaultAioHttpClient`.

The library maps aiohttp's errors onto httpx's coarsely (a refused connection and a reset
both become `ConnectTimeout`), but the failover policy treats those differently (DESIGN.md §5:
refused or reset → one quick retry; connect timeout → fail over without retrying), so the
cause is mapped again here, most specific first.
"""

import os
from collections.abc import Mapping

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

__all__ = ["upstream_client"]

_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, unreachable, DNS
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientConnectionResetError, httpx.ReadError),  # reset, or a kept-alive socket the server closed
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # a malformed status line or headers
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.RemoteProtocolError),
)


def _remapped(cause: BaseException, request: httpx.Request) -> httpx.TransportError | None:
    for aiohttp_error, httpx_error in _ERRORS:
        if isinstance(cause, aiohttp_error):
            return httpx_error(f"{type(cause).__name__}: {cause}", request=request)
    return None


class _Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.HTTPError as exc:  # the library's coarse mapping: map its cause again
            mapped = _remapped(exc.__cause__, request) if exc.__cause__ is not None else None
            raise (mapped or exc) from exc.__cause__
        except aiohttp.ClientError as exc:  # what the library lets through unmapped
            raise (_remapped(exc, request) or httpx.TransportError(str(exc), request=request)) from exc


def _proxy_mounts(limits: httpx.Limits, environ: Mapping[str, str]) -> dict[str, httpx.AsyncBaseTransport | None]:
    """httpx mounts for HTTP(S)_PROXY / NO_PROXY, read once at start-up.

    httpx reads these itself only when it builds its own transport, and aiohttp's `trust_env`
    would look them (and ~/.netrc) up again in a thread on every request.
    """
    env = {name.lower(): value for name, value in environ.items()}
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
    for scheme in ("http", "https"):
        proxy = env.get(f"{scheme}_proxy") or env.get("all_proxy")
        if proxy:
            mounts[f"{scheme}://"] = _Transport(limits=limits, proxy=httpx.Proxy(proxy))
    if mounts:
        for host in filter(None, (h.strip() for h in env.get("no_proxy", "").split(","))):
            if host == "*":
                return {}
            domain = host.lstrip(".")
            mounts[f"all://{domain}"] = None  # None: this host goes direct, through the default transport
            mounts[f"all://*.{domain}"] = None
    return mounts


def upstream_client(limits: httpx.Limits, environ: Mapping[str, str] | None = None) -> httpx.AsyncClient:
    """The pooled client for provider calls (keep-alive, no redirects: a provider never needs one)."""
    mounts = _proxy_mounts(limits, os.environ if environ is None else environ)
    return httpx.AsyncClient(transport=_Transport(limits=limits), mounts=mounts, limits=limits,
                             follow_redirects=False)
