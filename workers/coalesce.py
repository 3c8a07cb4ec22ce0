"""Text deltas of one stream that wait together in the publisher's queue go out as one chunk.

When the worker's event publisher is behind (a write in flight while a stream's next chunks are
read from upstream), each waiting chunk would still cost its own serialization, PUBLISH, Redis
fan-out, demultiplexing in the API and SSE write. A text delta that finds the same stream's
previous text delta still waiting joins it instead, so the cost per byte falls under load.
Nothing waits for this: a chunk is only ever added to one already queued, so the first token and
every chunk of an idle publisher leave as before. Order is kept (a chunk only joins the one right
before it), and only plain text of a single choice is joined: a role change, tool calls,
reasoning, logprobs, a finish reason or usage end the run, and such chunks go out as they came.
"""

from typing import Any

import orjson

from workers.protocol import encode_event

_SENT: dict[str, Any] = {}
# Choice fields a joinable chunk may carry (with a null finish_reason and logprobs).
_CHOICE_FIELDS = frozenset({"index", "delta", "finish_reason", "logprobs"})


def _text_of(chunk: dict[str, Any], opening: bool) -> str | None:
    """The delta's text if the chunk is plain text of choice 0 (`opening`: it may carry the role)."""
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1 or chunk.get("usage") is not None:
        return None
    choice = choices[0]
    if (type(choice) is not dict or choice.get("index", 0) != 0 or choice.get("finish_reason") is not None
            or choice.get("logprobs") is not None or not _CHOICE_FIELDS.issuperset(choice)):
        return None
    delta = choice.get("delta")
    if type(delta) is not dict:
        return None
    content = delta.get("content")
    if type(content) is not str:
        return None
    for name, value in delta.items():
        if name != "content" and value is not None and not (opening and name == "role"):
            return None
    return content


class QueuedChunk:
    """A chunk in the publisher's queue; built into its PUBLISH only when the publisher takes it."""

    __slots__ = ("_channel", "_chunk", "_job_id", "_joinable", "joined", "taken")

    def __init__(self, channel: str, job_id: str, chunk: dict[str, Any]) -> None:
        self._channel = channel
        self._job_id = job_id
        self._chunk = chunk
        self._joinable = _text_of(chunk, opening=True) is not None
        self.taken = False
        self.joined = 0  # chunks that joined this one

    def join(self, chunk: dict[str, Any]) -> bool:
        """Append a later chunk's text to this one, if both are plain text and this one still waits."""
        if self.taken or not self._joinable:
            return False
        text = _text_of(chunk, opening=False)
        if text is None:
            return False
        self._chunk["choices"][0]["delta"]["content"] += text
        self.joined += 1
        return True

    def command(self) -> tuple[str | bytes, ...]:
        """The PUBLISH to send; nothing joins it after this."""
        self.taken = True
        chunk, self._chunk = self._chunk, _SENT  # the job keeps its last QueuedChunk: not the chunk too
        return "PUBLISH", self._channel, encode_event(self._job_id, "chunk", orjson.dumps(chunk))
