"""The worker's upstream HTTP client.

httpx's own transport. An aiohttp-backed one (httpx-aiohttp) cost about half the CPU per
streamed call, but aiohttp hands out nothing it already received once a connection breaks
(its StreamReader raises before reading its buffer), so chunks that arrived just before a cut
were lost and a stream that could have continued from them started over shorter
(docs/performance.md). httpx reads what arrived, then reports the cut.
"""

import httpx

__all__ = ["upstream_client"]


def upstream_client(limits: httpx.Limits) -> httpx.AsyncClient:
    """The pooled client for provider calls (keep-alive, no redirects: a provider never needs one).

    HTTP(S)_PROXY / NO_PROXY apply as httpx reads them.
    """
    return httpx.AsyncClient(limits=limits, follow_redirects=False)
