"""The formats of the ids callers send in paths and bodies, checked before any Redis key is built.

An id is pasted into Redis key names (workers/protocol.py), so an id like `file-1:content`
would name another key. Every id the gateway issues has a fixed shape; anything else is
answered exactly like an id that does not exist, before Redis is asked.
"""

import re

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")
KEY_ID = re.compile(r"key_[0-9a-f]{16}")
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")
_ISSUED = (FILE_ID, BATCH_ID, KEY_ID, RESPONSE_ID)


def well_formed(pattern: re.Pattern[str], value: str) -> bool:
    """True when `value` is exactly an id of this shape."""
    return pattern.fullmatch(value) is not None


def quoted(value: str) -> str:
    """An id for an error message (" 'file-…'"), or "" for anything the gateway never issues.

    A malformed id may be anything (a prompt, a path, a megabyte): it is not echoed back.
    """
    return f" '{value}'" if any(well_formed(pattern, value) for pattern in _ISSUED) else ""
