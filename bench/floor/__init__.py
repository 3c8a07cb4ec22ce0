"""The added-latency floor of Freeference's request shape on this machine, with no product logic.

    .venv/bin/python -m bench.floor [--blocks 10] [--requests 200] [--warmup 300] [--json PATH]

This is NOT the gateway. Every request through the gateway takes the same fixed path:

    client → API → Redis (LPUSH) → worker (BLPOP) → upstream (SSE) → worker → Redis pub/sub → API → client

This package builds that path three times from the thinnest CPython parts available and measures
what it adds over calling the upstream directly, so the gateway's numbers in docs/performance.md can
be read against it: what lies above the floor is product logic (routing, limits, accounting, retries)
or avoidable overhead; what lies below it cannot be won without changing the shape or the language.

    V1  raw ASGI app on uvicorn (uvloop, httptools) + redis-py asyncio (hiredis); worker streams with httpx
    V2  the same, but the worker streams with aiohttp
    V3  raw asyncio Protocols on uvloop everywhere: hand-written HTTP/1.1 and RESP, no client libraries

All variants share one shape: one LPUSH per request onto one list, a worker claiming with BLPOP,
the upstream always called with "stream": true (a non-streaming answer is assembled in the worker,
as the gateway does), and one pub/sub reply channel per API process, subscribed at startup, on
which the worker publishes the whole answer or each SSE event.

Method (bench/floor/__main__.py): one fake upstream (`python -m bench.fake_upstream`, zero latency)
serves the direct target and all variants; each variant has its own Valkey, API and worker process.
One httpx client sends sequential requests (concurrency 1) after a warm-up. Each block runs every
target for N non-streaming and then N streaming requests, in an order rotated each block so no target
always follows the same one. Per block it takes p50/p99 per target; the table shows the median over
the blocks, and added = median over the blocks of (gateway − direct) of the same block. CPU per
request is user + system time from /proc/<pid>/stat over each target's blocks. Every response is
checked. The load average before and after is printed because a busy neighbour shows up as latency.
"""
