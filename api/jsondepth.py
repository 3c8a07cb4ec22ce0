"""A bound on how deeply a caller's JSON nests, checked right after it is parsed.

A job body is serialized again on its way to a worker: without a bound, a body nested a few
hundred levels deep became a 500 with a traceback (settings/json_depth.py). The bound applies
wherever a caller's JSON is parsed: live bodies, batch lines, uploaded batch files.
"""

from api.errors import OpenAIError, invalid_request
from settings.json_depth import nesting_exceeds

__all__ = ["nesting_exceeds", "too_deep"]


def too_deep(limit: int) -> OpenAIError:
    """The 400 for JSON nested deeper than `limit` levels."""
    return invalid_request(f"The JSON is nested too deeply: objects and arrays may nest at most {limit} levels.")
