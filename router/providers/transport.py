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

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

__all__ = ["upstream_client"]

_ERRORS: tuple[tuple[type[BaseException], type[httpx.HTTPError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, unreachable, DNS
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientOSError, httpx.ReadError),  # reset by peer
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.TransportError),
)


def _remapped(exc: httpx.HTTPError, request: httpx.Request) -> httpx.HTTPError:
    cause = exc.__cause__
    for aiohttp_error, httpx_error in _ERRORS:
        if isinstance(cause, aiohttp_error):
            if issubclass(httpx_error, httpx.RequestError):
                return httpx_error(str(exc), request=request)
            return httpx_error(str(exc))
    return exc


class _Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.HTTPError as exc:
            raise _remapped(exc, request) from exc.__cause__


def upstream_client(limits: httpx.Limits) -> httpx.AsyncClient:
    """The pooled client for provider calls (keep-alive, no redirects: a provider never needs one)."""
    return httpx.AsyncClient(transport=_Transport(limits=limits), limits=limits, follow_redirects=False)
