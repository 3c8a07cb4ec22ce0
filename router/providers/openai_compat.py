"""One adapter for every OpenAI-compatible provider, configured by catalog data (its profile)."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from router.catalog import Deployment
from router.errors import StreamBroken, UpstreamConnectError, UpstreamServerError, UpstreamTimeout
from router.providers.classify import error_for_status
from router.providers.dialects import parse_error
from router.providers.profile import prepare
from router.providers.sse import BodyCaps, StreamItem, TooLarge, completion_chunks, parse_sse, read_capped
from settings.json_depth import nesting_exceeds

__all__ = ["BodyCaps", "OpenAICompatProvider", "StreamItem"]

# A whole answer nested deeper than this could not be serialized again on its way to the caller.
_MAX_ANSWER_DEPTH = 64


def _request_bytes(body: dict[str, Any]) -> bytes:
    """The JSON body, in a buffer of its own size.

    orjson returns its output in the buffer it wrote into: at least 4 KB, and about ten times
    the text for larger bodies (a 20 KB prompt in 230 KB). A request's body is held for its
    whole stream, so the copy is what a stream costs in memory, not the buffer.
    """
    return bytes(memoryview(orjson.dumps(body)))


class OpenAICompatProvider:
    """POST {base_url}/chat/completions (and /embeddings) with the provider's key, extra headers and profile."""

    def __init__(self, client: httpx.AsyncClient, caps: BodyCaps | None = None) -> None:
        self._client = client
        self._caps = caps or BodyCaps()

    @staticmethod
    def prepare(deployment: Deployment, body: dict[str, Any]) -> dict[str, Any]:
        """The body this deployment's provider accepts; raises NotServable when it cannot serve it."""
        return prepare(body, deployment.provider.profile, deployment.provider.id)

    @staticmethod
    def _headers(deployment: Deployment, api_key: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **deployment.provider.config.headers}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    @staticmethod
    def _url(deployment: Deployment) -> str:
        return f"{deployment.provider.base_url}/chat/completions"

    @staticmethod
    def _timeout(deployment: Deployment, budget_s: float) -> httpx.Timeout:
        # No read timeout of the client's: every read below runs under a deadline of its own
        # (headers, first token, idle gap, total), and the client's would re-arm a timer for
        # every network read of every stream.
        t = deployment.provider.config.timeout
        return httpx.Timeout(connect=min(t.connect_s, budget_s), read=None, write=min(t.connect_s, budget_s),
                             pool=min(t.connect_s, budget_s))

    async def stream(self, deployment: Deployment, body: dict[str, Any], api_key: str | None,
                     budget_s: float) -> AsyncIterator[StreamItem]:
        """Yield parsed chunks of an already prepared body; raises typed errors for faults, timeouts and cuts."""
        t = deployment.provider.config.timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        end_by = started + min(t.total_s, budget_s)
        headers_by = min(started + t.connect_s + t.first_token_s, end_by)
        request = self._client.build_request("POST", self._url(deployment), content=_request_bytes(body),
                                             headers=self._headers(deployment, api_key),
                                             timeout=self._timeout(deployment, budget_s))
        response = await self._send(request, headers_by)
        profile = deployment.provider.config.profile
        try:
            if response.status_code >= 300:
                raise await self._error(deployment, response, headers_by)
            yield StreamItem(headers=response.headers)
            if response.headers.get("content-type", "").startswith("application/json"):
                for item in await self._whole_answer(deployment, response, headers_by, end_by):
                    yield item
                return
            events = parse_sse(response, loop, started, t.first_token_s, t.idle_s, end_by, self._caps,
                               lambda data: parse_error(data, profile.errors).message)
            try:
                async for item in events:
                    yield item
            finally:
                await events.aclose()
        finally:
            await response.aclose()

    async def embed(self, deployment: Deployment, body: dict[str, Any], api_key: str | None,
                    budget_s: float) -> tuple[Any, httpx.Headers]:
        """POST {base_url}/embeddings with an already prepared body: (the parsed JSON answer, its
        headers); raises the same typed errors as a chat call. An answer is read whole, up to the
        stream cap (thousands of vectors are far larger than a chat answer)."""
        t = deployment.provider.config.timeout
        started = asyncio.get_running_loop().time()
        end_by = started + min(t.total_s, budget_s)
        headers_by = min(started + t.connect_s + t.first_token_s, end_by)
        request = self._client.build_request("POST", f"{deployment.provider.base_url}/embeddings",
                                             content=_request_bytes(body), headers=self._headers(deployment, api_key),
                                             timeout=self._timeout(deployment, budget_s))
        response = await self._send(request, headers_by)
        try:
            if response.status_code >= 300:
                raise await self._error(deployment, response, headers_by)
            raw, data = await self._read_json(response, self._caps.stream_bytes, end_by)
            if isinstance(data, dict) and isinstance(data.get("error"), dict):  # an error with a 200 status
                raise error_for_status(502, raw, response.headers, deployment.provider.config.profile)
            return data, response.headers
        finally:
            await response.aclose()

    async def _send(self, request: httpx.Request, headers_by: float) -> httpx.Response:
        """Send `request` and wait for its headers until `headers_by`; transport failures typed."""
        try:
            async with asyncio.timeout_at(headers_by):
                return await self._client.send(request, stream=True)
        except TimeoutError:
            raise UpstreamTimeout("no response headers in time", phase="first_token") from None
        except httpx.ConnectTimeout:
            raise UpstreamTimeout("connect timeout", phase="connect") from None
        except httpx.ConnectError:
            raise UpstreamConnectError("connection refused or unreachable") from None
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError, httpx.TimeoutException):
            raise UpstreamServerError("connection reset by upstream") from None
        except httpx.HTTPError as exc:  # e.g. a base URL without a scheme: this route cannot work
            raise UpstreamConnectError(f"cannot reach the provider ({type(exc).__name__})") from None

    async def _error(self, deployment: Deployment, response: httpx.Response, read_by: float) -> Exception:
        """The typed failure of a non-2xx answer, its body read up to the error cap."""
        profile = deployment.provider.config.profile
        try:
            async with asyncio.timeout_at(read_by):
                body = await read_capped(response, self._caps.error_bytes)
        except TooLarge:
            if response.status_code == 429:  # the status and headers still say what it is
                return error_for_status(429, b"", response.headers, profile)
            # A provider that answers an error with megabytes is broken, whatever its status says.
            return UpstreamServerError(f"error body over {self._caps.error_bytes} bytes",
                                       status=response.status_code)
        except (TimeoutError, httpx.HTTPError):
            body = b""  # the status alone decides
        return error_for_status(response.status_code, body, response.headers, profile)

    @staticmethod
    async def _read_json(response: httpx.Response, cap_bytes: int, end_by: float) -> tuple[bytes, Any]:
        """(the body, its parsed JSON), read whole by `end_by`, up to `cap_bytes`; failures typed."""
        try:
            async with asyncio.timeout_at(end_by):
                raw = await read_capped(response, cap_bytes)
        except TooLarge:
            raise StreamBroken(f"upstream answer over {cap_bytes} bytes") from None
        except TimeoutError:
            raise UpstreamTimeout("upstream answer stalled (total)", phase="total") from None
        except httpx.HTTPError:
            raise StreamBroken("upstream connection was cut mid-answer") from None
        try:
            return raw, orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise StreamBroken("upstream sent a JSON answer that does not parse") from None

    async def _whole_answer(self, deployment: Deployment, response: httpx.Response, read_by: float,
                            end_by: float) -> list[StreamItem]:
        """A JSON answer to a streamed request: a whole completion, or an error with a 200 status."""
        body, data = await self._read_json(response, self._caps.body_bytes, end_by)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            # OpenRouter: an error found after the status was sent comes in a 200 body.
            code = data["error"].get("code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 502
            raise error_for_status(status, body, response.headers, deployment.provider.config.profile)
        if not isinstance(data, dict) or nesting_exceeds(data, _MAX_ANSWER_DEPTH, body):
            raise StreamBroken("upstream sent a JSON answer that is not a completion")
        return completion_chunks(data)
