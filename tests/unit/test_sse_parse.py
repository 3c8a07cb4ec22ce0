"""The adapter's SSE reader: line endings, events split across reads, a last line without a break."""

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from router.providers.openai_compat import OpenAICompatProvider, StreamItem
from tests.unit.test_failover_executor import deployments


def frame(content: str, finish: str | None = None, sep: bytes = b"\n\n") -> bytes:
    chunk = {"id": "x", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(chunk) + sep


class Pieces(httpx.AsyncByteStream):
    """A response body delivered in the given pieces, as separate network reads would."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


async def items(pieces: list[bytes]) -> list[StreamItem]:
    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Pieces(pieces), headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        provider = OpenAICompatProvider(client)
        return [item async for item in provider.stream(deployments()[0], {"messages": []}, None, 30.0)
                if item.headers is None]


def contents(got: list[StreamItem]) -> list[str]:
    return [item.chunk["choices"][0]["delta"]["content"] for item in got if item.chunk is not None]


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n", b"\r\r"])
async def test_every_line_ending_and_events_split_across_reads(sep: bytes) -> None:
    body = frame("a", sep=sep) + frame("b", sep=sep) + frame("", "stop", sep=sep) + b"data: [DONE]" + sep
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]  # split mid-line and mid-separator
    got = await items(pieces)
    assert contents(got) == ["a", "b", ""]
    assert got[-1].done


async def test_a_last_event_without_a_line_break_is_not_lost() -> None:
    got = await items([frame("a"), frame("", "stop", sep=b"")])
    assert contents(got) == ["a", ""]
    assert got[-1].chunk is not None and got[-1].chunk["choices"][0]["finish_reason"] == "stop"


async def test_comments_and_malformed_lines_are_skipped() -> None:
    got = await items([b": keep-alive\n\n", b"data: {not json\n\n", frame("a", "stop"), b"data: [DONE]\n\n"])
    assert [item.malformed for item in got] == [True, False, False]
    assert contents(got) == ["a"]
