"""Process logging: one JSON object per line, each naming the request it belongs to.

The request id comes from workers.protocol.REQUEST_ID, bound per request by the API's edge
middleware and per job by the worker, so API and worker lines of one request share it. Code
never logs keys or prompt text; as a second line of defence anything shaped like a bearer
token or a provider key is masked before a line is written.
"""

import logging
import re
import sys
import time
import traceback
from typing import Any

import orjson

from workers.protocol import REQUEST_ID

# Attributes every LogRecord has; anything else was passed with `extra=` and is emitted as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_SECRET = re.compile(r"(?i)(bearer\s+)[^\s\"',]+|\b(ff|sk|gsk|csk)-[A-Za-z0-9_\-]{8,}")


def redact(text: str) -> str:
    """Mask bearer tokens and key-shaped strings."""
    return _SECRET.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


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
        if record.exc_info:
            out["exc"] = redact("".join(traceback.format_exception(*record.exc_info)))
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    """Human-readable lines (with the request id when there is one), still redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The classic line, request id appended."""
        line = redact(super().format(record))
        request_id = REQUEST_ID.get()
        return f"{line} [{request_id}]" if request_id else line


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger (uvicorn's and arq's included) through one stderr handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq", "arq.worker"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
