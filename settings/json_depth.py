"""How deeply JSON nests: one bounded walk that every layer uses (settings is the one package all import).

orjson parses 1,024 levels, but serializers give up far sooner (orjson and pydantic at about
254): JSON nested a few hundred levels deep, parsed fine, fails later when it is serialized
again. The API bounds what callers send (api/jsondepth.py); the worker bounds what upstreams
stream (router/providers/sse.py).
"""

from typing import Any


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
