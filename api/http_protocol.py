"""uvicorn's httptools protocol with bounds on the request head (docs/security.md).

uvicorn's h11 protocol can cap an incomplete request head (`h11_max_incomplete_event_size`), but
the gateway runs httptools (much cheaper per request), which has no such cap: twenty requests
with 10 MB headers grew an API process by about 200 MB. Nor does uvicorn time out a request
head that never completes, or a connection that never sends one, so slowloris connections
stayed open for ever. This subclass adds, per connection:

- a cap on the bytes of a request head (request line and headers): past it, 431 and close;
- a cap on the number of header lines: past it, 431 and close;
- a deadline for a head, from the connection's start or the request's first byte: past it,
  408 (or a silent close for a connection that never sent a byte);
- no keep-alive for a request whose body was not read to its end: the rest of it must not be
  parsed as the next request, and a slow body must not hold the connection.

Bytes are counted as they arrive, before the parser buffers them, so an oversized head costs
at most one socket read (256 KiB) beyond the cap.
"""

import asyncio
import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.metrics import HEAD_REFUSALS

log = logging.getLogger("freeference.edge")


def _raw_response(status: int, phrase: str, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": code}})
    head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def bounded_protocol(max_head_bytes: int, max_headers: int, head_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class to pass as uvicorn's `http`, with these bounds."""
    too_large = _raw_response(431, "Request Header Fields Too Large", "request_header_fields_too_large",
                              f"The request head is larger than the limit of {max_head_bytes} bytes or "
                              f"{max_headers} header lines.")
    too_slow = _raw_response(408, "Request Timeout", "request_timeout",
                             f"The request head did not arrive within {head_timeout_s:g} s.")

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True  # between a request's first byte (or the connection's start) and its headers' end
            self._head_bytes = 0
            self._header_lines = 0
            self._head_parsed = 0  # bytes of the request line and headers the parser handed over
            self._any_bytes = False
            self._refusing: str | None = None  # why the request being parsed is refused
            self._head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return  # refused already: nothing more is parsed
            self._any_bytes = True
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self._refusing:
                self._refuse(too_large, self._refusing)
            elif self._in_head:
                # A head still incomplete: its bytes so far, before the parser buffers more of it.
                # Counted after parsing, as the parser's on_message_begin resets the count.
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes:
                    self._refuse(too_large, "head_too_large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._head_bytes = self._head_parsed = self._header_lines = 0
            if self._head_timer is None:
                self._arm_head_timer()

        def on_url(self, url: bytes) -> None:
            self._head_parsed += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_lines += 1
            self._head_parsed += len(name) + len(value) + 4  # ": " and CRLF
            if self._header_lines > max_headers:
                self._refusing = "too_many_headers"  # refused in data_received, right after this parse
            elif not self._refusing:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._cancel_head_timer()
            if self._head_parsed > max_head_bytes and not self._refusing:
                self._refusing = "head_too_large"  # a whole head that arrived in one read
            if not self._refusing:  # else no request starts: it is refused
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refusing:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refusing:
                super().on_message_complete()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not self.transport.is_closing():
                # The app answered without reading the whole body (a refusal): close, never keep alive.
                self.transport.close()
            super().on_response_complete()

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._in_head or self.transport.is_closing():
                return
            if self._any_bytes:
                self._refuse(too_slow, "head_timeout")
            else:
                HEAD_REFUSALS["idle_connection"] += 1
                self.transport.close()

        def _refuse(self, response: bytes, reason: str) -> None:
            HEAD_REFUSALS[reason] += 1
            log.info("request head refused (%s)", reason.replace("_", " "))
            self._cancel_head_timer()
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(response)
            self.transport.close()

    return BoundedHttpToolsProtocol
