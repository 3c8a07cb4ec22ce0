"""Process logging: one JSON object per line, each naming the request it belongs to.

The request id comes from workers.protocol.REQUEST_ID, bound per request by the API's edge
middleware and per job by the worker, so API and worker lines of one request share it. Code
never logs keys or prompt text; as a second line of defence anything shaped like a bearer
token or a provider key is masked before a line is written, and a traceback shows where an
error happened but not its message (a parser's or a validator's message quotes the input it
refused, i.e. the caller's prompt), except for network errors, whose messages name hosts.
"""

import logging
import re
import sys
import time
import traceback
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from settings.logfields import STORE_DOWN_FIELD, STORE_UP_FIELD
from workers.protocol import REQUEST_ID

# Attributes every LogRecord has; anything else was passed with `extra=` and is emitted as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_SECRET = re.compile(r"(?i)(bearer\s+)[^\s\"',]+|\b(ff|sk|gsk|csk)-[A-Za-z0-9_\-]{8,}")


# Errors whose messages are about the network, never about a request's content.
_MESSAGE_KEPT = (OSError, TimeoutError, RedisConnectionError, RedisTimeoutError)


def redact(text: str) -> str:
    """Mask bearer tokens and key-shaped strings."""
    return _SECRET.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


def safe_traceback(exc: BaseException) -> str:
    """A traceback (with its causes) whose exception messages are withheld, but for network errors."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts = []
    for error in reversed(chain):  # the oldest first, as Python prints them
        kind = type(error)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        detail = f": {error}" if isinstance(error, _MESSAGE_KEPT) else " (message withheld)"
        parts.append("Traceback (most recent call last):\n" + "".join(traceback.format_tb(error.__traceback__))
                     + name + detail + "\n")
    return "\nThe above led to:\n\n".join(parts)


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", "request_id"?, "pid", extras..., "exc"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line for the record."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "pid": record.process,
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            out["request_id"] = request_id
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                out[name] = value if isinstance(value, int | float | bool) or value is None else redact(str(value))
        if record.exc_info and record.exc_info[1] is not None:
            out["exc"] = redact(safe_traceback(record.exc_info[1]))
        return orjson.dumps(out).decode()


class StoreOutageFilter(logging.Filter):
    """One warning per Redis outage instead of one per loop, job and retry (settings/logfields.py).

    The first STORE_DOWN line of an outage passes and the rest are counted; a STORE_UP line ends
    the outage and says how long it lasted and how many lines it held back. An outage also ends
    after `quiet_s` without a STORE_DOWN line (a loop that would have said STORE_UP may be gone).
    """

    def __init__(self, quiet_s: float = 60.0) -> None:
        super().__init__()
        self._quiet_s = quiet_s
        self._since: float | None = None
        self._last = 0.0
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the lines an outage holds back."""
        if getattr(record, STORE_DOWN_FIELD, False):
            if self._since is not None and record.created - self._last < self._quiet_s:
                self._last = record.created
                self._held += 1
                return False
            self._since = self._last = record.created
            self._held = 0
            return True
        if getattr(record, STORE_UP_FIELD, False):
            if self._since is None:
                return False  # nothing was down: nothing to say
            record.msg = f"{record.msg} (unreachable for %.1f s; %d similar lines held back)"
            record.args = (*(record.args if isinstance(record.args, tuple) else ()), record.created - self._since,
                           self._held)
            self._since = None
            return True
        return True


class TextFormatter(logging.Formatter):
    """Human-readable lines (with the request id when there is one), still redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatException(self, ei: Any) -> str:
        """The traceback without exception messages (safe_traceback)."""
        return safe_traceback(ei[1]) if ei and ei[1] is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        """The classic line, request id appended."""
        line = redact(super().format(record))
        request_id = REQUEST_ID.get()
        return f"{line} [{request_id}]" if request_id else line


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger (uvicorn's and arq's included) through one stderr handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(StoreOutageFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq", "arq.worker"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # httpx logs every request line at INFO: upstream URLs in a worker, noise between the
    # progress bar of `freeference batch`. Its warnings still pass.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
