"""Connection failures through the upstream client keep the httpx types the policy tells apart."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from cli.embedded_redis import free_port
from router.providers.transport import upstream_client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LIMITS = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=5)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with upstream_client(LIMITS) as client:
        yield client


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/chat/completions"


async def test_refused_connection_is_a_connect_error(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.ConnectError):
        await client.post(f"http://127.0.0.1:{free_port()}/v1/chat/completions", content=b"{}")


async def test_connection_closed_before_the_status_line_is_a_protocol_error(client: httpx.AsyncClient) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.close()

    server, url = await serve(hang_up)
    async with server:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(url, content=b"{}")


async def test_silence_past_the_read_timeout_is_a_read_timeout(client: httpx.AsyncClient) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        await asyncio.sleep(5)

    server, url = await serve(silent)
    async with server:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(url, content=b"{}", timeout=httpx.Timeout(5, read=0.2))


async def test_a_body_cut_mid_stream_is_a_read_error(client: httpx.AsyncClient) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 1000\r\n\r\ndata: {}\n\n")
        await writer.drain()
        writer.close()

    server, url = await serve(cut)
    async with server, client.stream("POST", url, content=b"{}") as response:
        assert response.status_code == 200
        with pytest.raises(httpx.TransportError):
            async for _ in response.aiter_lines():
                pass

