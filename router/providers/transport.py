"""The worker's upstream HTTP client: httpx's interface, aiohttp's wire.

httpx's own transport (httpcore + h11, pure Python) costs about twice the CPU per streamed
completion of aiohttp's C parser on this machine, and it is on the critical path of every
request (docs/performance.md). So provider calls keep httpx's client interface (the adapter,
its error mapping and the unit tests' MockTransport stay as they are) over this transport.

Two things it does that a generic aiohttp transport (such as httpx-aiohttp) does not:

- **Received bytes survive a cut.** aiohttp's StreamReader raises a broken connection's error
  before it hands out data it had already received, so the chunks that arrived just before a
  cut would vanish: a finished answer whose connection then broke would look unfinished, and a
  continuation would start from less than the caller was about to get. The body stream here
  hands those bytes out first, then reports the cut.
- **Errors keep the meaning the failover policy reads** (DESIGN.md §5): refused or reset → a
  quick retry; connect timeout → fail over without retrying; a cut body → stream broken.

Proxies from the environment (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY) still apply: httpx ignores
them once a client is given its own transport, so `upstream_client` mounts httpx's proxy
transports for them itself, and only direct calls go through this one.
"""

import http.cookiejar
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol, cast

import aiohttp
import httpx

__all__ = ["AiohttpTransport", "BodyReads", "body_reads", "upstream_client"]

# The response extension that carries this transport's body to body_reads.
_BODY = "freeference.aiohttp_body"

# Most specific first: several aiohttp errors subclass others (a connect timeout is also a
# server timeout; a refused connection is also an OSError).
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, unreachable, DNS, TLS handshake
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientOSError, httpx.ReadError),  # reset by peer
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (TimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientError, httpx.TransportError),
)


def _mapped(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    for aiohttp_error, httpx_error in _ERRORS:
        if isinstance(exc, aiohttp_error):
            return httpx_error(f"{type(exc).__name__}: {exc}", request=request)
    return httpx.TransportError(type(exc).__name__, request=request)


def _received_but_unread(content: aiohttp.StreamReader) -> bytes:
    # A private attribute, read only after the connection broke (see the module docstring);
    # tests/unit/test_upstream_transport.py fails if an aiohttp release changes it.
    buffer = getattr(content, "_buffer", None) or ()
    data = b"".join(buffer)
    if buffer:
        buffer.clear()
    return data


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request
        self._cut: httpx.TransportError | None = None

    async def read(self) -> bytes:
        """The next network read as it came (b"" at the body's end); a cut raises its mapped
        error, after the bytes received before it were handed out."""
        if self._cut is not None:
            raise self._cut
        content = self._response.content
        try:
            return await content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._cut = _mapped(exc, self._request)
            leftover = _received_but_unread(content)
            if leftover:
                return leftover
            raise self._cut from None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    async def aclose(self) -> None:
        # Back to the pool when the body was read to its end; closed otherwise.
        self._response.release()


class BodyReads(Protocol):
    """A response body's network reads, one at a time."""

    async def read(self) -> bytes:
        """The next read (never empty), or b"" at the body's end; httpx's errors for faults."""
        ...

    async def aclose(self) -> None: ...


class _HttpxReads:
    """Reads through httpx's response iteration (content decoding, another transport)."""

    def __init__(self, response: httpx.Response) -> None:
        self._reads = cast(AsyncGenerator[bytes, None], response.aiter_bytes())  # httpx types it as an iterator

    async def read(self) -> bytes:
        return await anext(self._reads, b"")  # httpx hands out no empty reads

    async def aclose(self) -> None:
        await self._reads.aclose()


class _DirectReads:
    def __init__(self, body: _Body) -> None:
        self.read = body.read

    async def aclose(self) -> None:
        pass  # the response's own close releases the connection


def body_reads(response: httpx.Response) -> BodyReads:
    """The body of a streamed response, read by network read.

    An answer of this transport that needs no decoding is read from aiohttp's StreamReader
    directly: httpx's response iteration adds four async generators and a decoder per read,
    a measurable share of a worker's CPU at a thousand streams (docs/performance.md). The same
    error mapping and cut semantics apply either way.
    """
    body = response.extensions.get(_BODY)
    if isinstance(body, _Body) and response.headers.get("content-encoding", "identity") == "identity":
        return _DirectReads(body)
    return _HttpxReads(response)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (created on first use, inside the worker's event loop)."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._limits = limits
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                limit_per_host=0,
                keepalive_timeout=self._limits.keepalive_expiry or 0,
                # httpx's default context: certifi's CA bundle, SSL_CERT_FILE / SSL_CERT_DIR honoured.
                ssl=httpx.create_ssl_context(),
            )
            # No cookie jar: providers never need one, and parsing Set-Cookie on every answer costs.
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                                  auto_decompress=False)
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        try:
            response = await self._session_now().request(
                request.method, str(request.url), headers=request.headers.multi_items(),
                data=request.content or None, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=timeout.get("pool"),
                                              sock_connect=timeout.get("connect"), sock_read=timeout.get("read")),
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _mapped(exc, request) from None
        # auto_decompress is off, so the headers are the wire's and httpx decodes the body itself.
        body = _Body(response, request)
        return httpx.Response(status_code=response.status, headers=response.raw_headers, stream=body, request=request,
                              extensions={"http_version": b"HTTP/1.1", _BODY: body})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _environment_proxies(limits: httpx.Limits) -> dict[str, httpx.AsyncBaseTransport | None]:
    """Mounts for HTTP(S)_PROXY / ALL_PROXY / NO_PROXY, read the way httpx reads them itself.

    None mounts a NO_PROXY pattern on the client's own transport.
    """
    from httpx._utils import get_environment_proxies  # httpx's reader; it skips it for custom transports

    return {pattern: None if url is None else httpx.AsyncHTTPTransport(proxy=url, limits=limits)
            for pattern, url in get_environment_proxies().items()}


class _NoCookies(http.cookiejar.CookieJar):
    """Keeps no cookie: providers never need one, and reading Set-Cookie off every answer cost
    a worker a few percent of its CPU at a thousand streams (the transport's aiohttp session
    keeps none either)."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


def upstream_client(limits: httpx.Limits) -> httpx.AsyncClient:
    """The pooled client for provider calls (keep-alive, no redirects: a provider never needs one).

    The environment's proxies are read once, here (a change needs a worker restart).
    """
    return httpx.AsyncClient(transport=AiohttpTransport(limits), mounts=_environment_proxies(limits), limits=limits,
                             follow_redirects=False, cookies=_NoCookies())
