"""What the Responses and Messages translations add over chat completions, in one run.

    python -m bench.dialects_overhead [--blocks 10] [--requests 100]

Starts a private Valkey, the fake upstream, one API and two workers (bench/harness.py), then, in
alternating blocks (the order rotated every block, so the machine's drift hits all alike),
sends the same request sequentially at concurrency 1 as a chat completion, a Responses request
and a Messages request, non-streaming and streaming, plus a direct call to the fake. Every
answer is checked whole against the fake's numbered tokens. Prints, per endpoint, the median
over blocks of p50 (whole answer; first event for streams) and the median per-block difference
to chat, which is what the translation costs.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import uvloop

from bench.fake_upstream import reply_tokens
from bench.harness import AUTO_MODEL, DIRECT_AUTH, Stack, load_average, percentile, running_stack

MAX_TOKENS = 16
PROMPT = "Say hello to the gateway."


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    body: Callable[[bool], dict[str, Any]]
    text: Callable[[dict[str, Any]], str]  # the answer's text, from the non-streaming body
    stream_text: Callable[[bytes], str]  # the answer's text, from the whole SSE body


def _data_lines(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]


ENDPOINTS = [
    Endpoint("chat", "/v1/chat/completions",
             lambda stream: {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
                             "stream": stream},
             lambda body: body["choices"][0]["message"]["content"],
             lambda raw: "".join((c.get("delta") or {}).get("content") or "" for d in _data_lines(raw)
                                 for c in d.get("choices") or [])),
    Endpoint("responses", "/v1/responses",
             lambda stream: {"input": PROMPT, "max_output_tokens": MAX_TOKENS, "stream": stream, "store": False},
             lambda body: body["output"][0]["content"][0]["text"],
             lambda raw: "".join(d["delta"] for d in _data_lines(raw)
                                 if d.get("type") == "response.output_text.delta")),
    Endpoint("messages", "/v1/messages",
             lambda stream: {"model": "claude-x", "messages": [{"role": "user", "content": PROMPT}],
                             "max_tokens": MAX_TOKENS, "stream": stream},
             lambda body: body["content"][0]["text"],
             lambda raw: "".join(d["delta"].get("text", "") for d in _data_lines(raw)
                                 if d.get("type") == "content_block_delta")),
]


def _whole(endpoint: Endpoint) -> Callable[[bytes], str]:
    return lambda raw: endpoint.text(orjson.loads(raw))


async def _timed(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: bytes, stream: bool,
                 check: Callable[[bytes], str], expected: str) -> float:
    started = time.perf_counter()
    if not stream:
        response = await client.post(url, content=body, headers=headers)
        elapsed = time.perf_counter() - started
        if response.status_code != 200 or check(response.content) != expected:
            raise RuntimeError(f"bad answer from {url}: HTTP {response.status_code}")
        return elapsed
    first: float | None = None
    received = bytearray()
    async with client.stream("POST", url, content=body, headers=headers) as response:
        async for piece in response.aiter_raw():
            if first is None and b"data:" in piece:
                first = time.perf_counter() - started
            received += piece
    if response.status_code != 200 or first is None or check(bytes(received)) != expected:
        raise RuntimeError(f"bad stream from {url}: HTTP {response.status_code}")
    return first


async def run(stack: Stack, blocks: int, requests: int) -> None:
    expected = "".join(reply_tokens(AUTO_MODEL, MAX_TOKENS))
    gateway_headers = {"Authorization": f"Bearer {stack.key}", "Content-Type": "application/json"}
    direct_headers = {"Authorization": DIRECT_AUTH, "Content-Type": "application/json"}
    direct_body = orjson.dumps({"model": AUTO_MODEL, "messages": [{"role": "user", "content": PROMPT}],
                                "max_tokens": MAX_TOKENS})
    print(f"bench.dialects_overhead: {blocks} blocks x {requests} requests per endpoint and mode; "
          f"load average {load_average()}")
    async with httpx.AsyncClient(timeout=30) as client:
        for stream in (False, True):
            p50s: dict[str, list[float]] = {"direct": [], **{e.name: [] for e in ENDPOINTS}}
            for block in range(blocks):
                order = ENDPOINTS[block % 3:] + ENDPOINTS[:block % 3]
                for endpoint in order:
                    body = orjson.dumps(endpoint.body(stream))
                    check = endpoint.stream_text if stream else _whole(endpoint)
                    samples = [await _timed(client, stack.gateway.base_url + endpoint.path, gateway_headers, body,
                                            stream, check, expected) for _ in range(requests)]
                    p50s[endpoint.name].append(percentile(samples, 50))
                direct = [await _timed(client, stack.direct_url, direct_headers, direct_body, False,
                                       lambda raw: orjson.loads(raw)["choices"][0]["message"]["content"], expected)
                          for _ in range(requests)]
                p50s["direct"].append(percentile(direct, 50))
            mode = "streaming (first event)" if stream else "non-streaming (whole answer)"
            print(f"  {mode}: direct p50 {statistics.median(p50s['direct']) * 1000:.2f} ms")
            for endpoint in ENDPOINTS:
                own = p50s[endpoint.name]
                diffs = [(a - c) * 1000 for a, c in zip(own, p50s["chat"], strict=True)]
                print(f"    {endpoint.name:<10} p50 {statistics.median(own) * 1000:6.2f} ms   vs chat: median "
                      f"{statistics.median(diffs):+.2f} ms [{min(diffs):+.2f}..{max(diffs):+.2f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    with running_stack(workers=2) as stack:
        uvloop.run(run(stack, args.blocks, args.requests))


if __name__ == "__main__":
    main()
