"""A bound on how deeply a caller's JSON nests, checked right after it is parsed.

orjson parses 1,024 levels, but serializers give up far sooner (orjson and pydantic at about
254), and a job body is serialized again on its way to a worker: without a bound, a body nested
a few hundred levels deep became a 500 with a traceback. The bound applies wherever a caller's
JSON is parsed: live bodies, batch lines, uploaded batch files.
"""

from typing import Any

from api.errors import OpenAIError, invalid_request


def too_deep(limit: int) -> OpenAIError:
    """The 400 for JSON nested deeper than `limit` levels."""
    return invalid_request(f"The JSON is nested too deeply: objects and arrays may nest at most {limit} levels.")


def nesting_exceeds(value: Any, limit: int, raw: bytes | None = None) -> bool:
    """True when objects/arrays in `value` nest deeper than `limit` levels (the value itself is level 1).

    `raw`: the JSON text `value` was parsed from, when at hand. A text with no more brackets
    than the limit cannot nest deeper than it, so a small body costs two byte counts, no walk.
    """
    if not isinstance(value, dict | list):
        return False
    if raw is not None and raw.count(b"{") + raw.count(b"[") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                if depth == limit:
                    return True
                stack.append((child, depth + 1))
    return False
