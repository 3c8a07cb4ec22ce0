"""The upstream client: connection failures keep the httpx types the policy tells apart, and
connections go back to the pool after a whole answer."""

import asyncio
import contextlib
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trustme

from cli.embedded_redis import free_port
from router.attempt import RunState, stream_attempt
from router.catalog import RuntimeCatalog
from router.providers.openai_compat import OpenAICompatProvider
from router.providers.transport import body_reads, upstream_client
from settings.catalog import CatalogFile

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



def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def test_an_answer_ended_by_its_usage_chunk_leaves_the_connection_for_the_next_call(
        client: httpx.AsyncClient) -> None:
    # The consumer stops at the usage chunk (it does not wait for a [DONE] that may not come);
    # [DONE] and the body's end arrive a moment later, in their own network read. The adapter
    # must still read them, or every call pays a new connection (a TLS handshake in production).
    connections = 0

    async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:"))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            finish = b'{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}'
            writer.write(_chunked(b"data: " + finish + b"\n\n"))
            writer.write(_chunked(b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'))
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(_chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()

    server, url = await serve(sse)
    file = CatalogFile.model_validate({
        "providers": [{"id": "p", "base_url": url.removesuffix("/chat/completions"), "requires_key": False}],
        "models": [{"id": "m", "provider": "p", "upstream_name": "m", "context_window": 1000,
                    "scores": {"general": 0.5}}],
        "capabilities": {"text-basic": {"name": "G", "intent": "general"}},
    })
    deployment = RuntimeCatalog.build(file, {}).deployments[0]
    provider = OpenAICompatProvider(client)

    async def nothing(*_: object) -> None:
        return None

    async with server:
        for _ in range(3):
            state = RunState()
            await stream_attempt(provider, deployment, {}, None, 5.0, state, nothing, nothing,
                                 forward_usage_chunk=True)
            assert state.usage == {"total_tokens": 3}
    assert connections == 1


# An answer whose last events and the connection's end arrive together, 1,000 bytes short.
_CUT_EVENTS = b"data: {\"n\": 1}\n\ndata: {\"n\": 2, \"finish_reason\": \"stop\"}\n\n"


async def _answer_then_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 1000\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.01)
    writer.write(_CUT_EVENTS)
    writer.close()


async def test_bytes_received_before_a_cut_are_handed_out_before_the_error(client: httpx.AsyncClient) -> None:
    # The last events and the connection's end both arrive while the reader is busy elsewhere:
    # the finish chunk must not be lost to the cut (it decides whether the answer was whole).
    server, url = await serve(_answer_then_cut)
    async with server:
        for _ in range(3):
            received = b""
            async with client.stream("POST", url) as response:
                await asyncio.sleep(0.1)  # the events and the close land before the body is read
                with pytest.raises(httpx.ReadError):
                    async for block in response.aiter_bytes():
                        received += block
            assert received == _CUT_EVENTS


async def test_direct_reads_hand_out_received_bytes_before_the_cut_too(client: httpx.AsyncClient) -> None:
    # The SSE reader reads this transport's bodies from aiohttp directly (body_reads): the same
    # cut semantics as through httpx's iteration.
    server, url = await serve(_answer_then_cut)
    async with server, client.stream("POST", url) as response:
        await asyncio.sleep(0.1)
        reads = body_reads(response)
        received = b""
        with pytest.raises(httpx.ReadError):
            while block := await reads.read():
                received += block
        assert received == _CUT_EVENTS
        with pytest.raises(httpx.ReadError):  # and the cut stays a cut
            await reads.read()


async def test_an_encoded_body_is_read_through_httpx_decoding(client: httpx.AsyncClient) -> None:
    events = b"data: {\"n\": 1}\n\ndata: [DONE]\n\n"
    packed = gzip.compress(events)

    async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n"
                     b"content-length: %d\r\n\r\n" % len(packed) + packed)
        await writer.drain()

    server, url = await serve(gzipped)
    async with server, client.stream("POST", url) as response:
        reads = body_reads(response)
        received = b""
        while block := await reads.read():
            received += block
        await reads.aclose()
    assert received == events


async def test_proxies_from_the_environment_apply_and_no_proxy_hosts_go_direct(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    proxy, proxy_url = await serve(answer)
    direct, direct_url = await serve(answer)
    monkeypatch.setenv("HTTP_PROXY", proxy_url.removesuffix("/v1/chat/completions"))
    monkeypatch.setenv("NO_PROXY", "localhost")
    async with proxy, direct, upstream_client(LIMITS) as client:
        # Through the proxy: the request line names the whole target URL.
        assert (await client.post("http://provider.invalid/v1/chat/completions", content=b"{}")).status_code == 200
        assert seen == [b"POST http://provider.invalid/v1/chat/completions HTTP/1.1"]
        # A NO_PROXY host is called directly.
        local = direct_url.replace("127.0.0.1", "localhost")
        assert (await client.post(local, content=b"{}")).status_code == 200
        assert seen[1] == b"POST /v1/chat/completions HTTP/1.1"


async def test_https_providers_are_verified_against_the_trusted_cas(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    # Every real provider is HTTPS: the transport verifies certificates with httpx's context
    # (certifi, or SSL_CERT_FILE when set), and an untrusted one is a connect error.
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_context)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    async with server:
        async with upstream_client(LIMITS) as client:
            with pytest.raises(httpx.ConnectError):
                await client.post(url, content=b"{}")
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        async with upstream_client(LIMITS) as client:
            assert (await client.post(url, content=b"{}")).status_code == 200
