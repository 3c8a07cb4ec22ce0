"""Just enough RESP (the Redis protocol) for V3: encode a command, parse replies off a byte buffer."""

import asyncio
from collections.abc import Callable
from typing import Any

INCOMPLETE = object()


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)


def parse(buffer: bytearray, pos: int) -> tuple[Any, int]:
    """-> (value, position after it), or (INCOMPLETE, pos) when the buffer ends inside the value."""
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        return INCOMPLETE, pos
    kind, head = buffer[pos], buffer[pos + 1 : end]
    if kind == ord("$"):
        size = int(head)
        if size < 0:
            return None, end + 2
        if len(buffer) < end + 4 + size:
            return INCOMPLETE, pos
        return bytes(buffer[end + 2 : end + 2 + size]), end + 4 + size
    if kind == ord("*"):
        items = []
        after = end + 2
        for _ in range(int(head)):
            item, after = parse(buffer, after)
            if item is INCOMPLETE:
                return INCOMPLETE, pos
            items.append(item)
        return items, after
    if kind == ord(":"):
        return int(head), end + 2
    return bytes(head), end + 2  # +simple string or -error


class Resp(asyncio.Protocol):
    """One Redis connection. on_reply gets every top-level reply; without it replies are not even parsed
    (the LPUSH and PUBLISH connections fire and forget)."""

    def __init__(self, on_reply: Callable[[Any], None] | None = None) -> None:
        self.on_reply = on_reply
        self.buffer = bytearray()
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, *args: bytes) -> None:
        self.transport.write(command(*args))

    def data_received(self, data: bytes) -> None:
        if self.on_reply is None:
            return
        self.buffer += data
        pos = 0
        while pos < len(self.buffer):
            value, after = parse(self.buffer, pos)
            if value is INCOMPLETE:
                break
            pos = after
            self.on_reply(value)
        del self.buffer[:pos]
