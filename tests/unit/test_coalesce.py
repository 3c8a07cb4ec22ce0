"""Joining queued text deltas of one stream (workers/coalesce.py) and the publisher's wire format."""

from typing import Any

import orjson
import pytest

from workers.coalesce import QueuedChunk
from workers.events import resp_commands
from workers.protocol import split_event


def _text(content: str, **delta: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": content, **delta}, "finish_reason": None}]}


def _sent(queued: QueuedChunk) -> dict[str, Any]:
    _, channel, message = queued.command()
    assert channel == "ff:reply:api"
    job_id, event_type, payload = split_event(message)
    assert (job_id, event_type) == ("job-1", "chunk")
    assert b"\n" not in payload  # one line: the API joins several chunks by newlines
    return orjson.loads(payload)


def test_text_joins_the_waiting_chunk_in_order() -> None:
    queued = QueuedChunk("ff:reply:api", "job-1", _text("Hel", role="assistant"))
    assert queued.join(_text("lo"))
    assert queued.join(_text(" world"))
    assert queued.joined == 2
    assert _sent(queued)["choices"][0]["delta"] == {"content": "Hello world", "role": "assistant"}
    assert not queued.join(_text("!"))  # taken by the publisher: the next chunk goes on its own


@pytest.mark.parametrize("later", [
    {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]},
    {"choices": [{"index": 0, "delta": {"content": "x", "reasoning_content": "y"}}]},
    {"choices": [{"index": 0, "delta": {"content": "x", "role": "assistant"}}]},
    {"choices": [{"index": 1, "delta": {"content": "x"}}]},
    {"choices": [{"index": 0, "delta": {"content": "x"}}, {"index": 1, "delta": {"content": "y"}}]},
    {"choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": {"content": []}}]},
    {"choices": [], "usage": {"prompt_tokens": 1}},
])
def test_nothing_but_plain_text_joins(later: dict[str, Any]) -> None:
    queued = QueuedChunk("ff:reply:api", "job-1", _text("a"))
    assert not queued.join(later)
    assert _sent(queued)["choices"][0]["delta"]["content"] == "a"


def test_nothing_joins_a_chunk_that_is_not_plain_text() -> None:
    finish = QueuedChunk("ff:reply:api", "job-1", {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    assert not finish.join(_text("late"))


def test_commands_are_packed_as_redis_reads_them() -> None:
    packed = resp_commands([("PUBLISH", "ch", b"a b"), ("DEL", "k1", "k\u00e9")])
    assert packed == (b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$3\r\na b\r\n"
                      b"*3\r\n$3\r\nDEL\r\n$2\r\nk1\r\n$3\r\nk\xc3\xa9\r\n")
