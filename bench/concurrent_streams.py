"""Many concurrent long streams: the gateway beside the fake upstream, at growing counts.

    python -m bench.concurrent_streams [--counts 100,500,1000,2000,5000] [--chunks 40]
        [--interval-ms 250] [--workers 1] [--apis 1] [--repo PATH] [--env NAME=VALUE ...]

LLM answers are long streams that mostly wait on the provider, so what a gateway must hold is
many open streams at once. Starts a private Valkey, the fake upstream (every answer paced:
`--chunks` tokens `--interval-ms` apart), `--apis` API replicas and `--workers` workers with
default settings (bench/harness.py; the catalog is the tests' with the default provider
timeouts, not the tests' short ones), then for each count N opens N streams at once, first
straight to the fake, then through the gateway (spread over the API replicas in turn), and
reports per N:

- streams whole and in order, and the failures by kind (HTTP status and code, in-band error
  code, or exception);
- time to the first token, p50 / p99, and how fast refusals came (a refusal must be at once);
- CPU of the gateway's processes (API, workers, Redis) per upstream chunk (a token of the fake;
  under load the gateway joins queued text deltas, so the client may receive fewer events), and
  while every stream only streams, how many tokens an event carried then;
- resident memory of API and workers per open stream (growth from before the first burst to
  the moment every stream has its first token, divided by the streams open then).

The client is aiohttp (far cheaper per stream than httpx), one connection per stream. Every
stream holds a socket in the client, the API, the worker and the fake: the soft limit on open
files (`ulimit -n`) is raised to the hard limit here, and the gateway's processes inherit it.
"""

import argparse
import asyncio
import itertools
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.fake_upstream import reply_tokens
from bench.harness import AUTO_MODEL, DIRECT_AUTH, Stack, cpu_seconds, load_average, percentile, running_stack
from settings import Settings
from tests.support.processes import catalog_yaml


@dataclass
class Outcome:
    """One stream's fate."""

    ok: bool
    kind: str  # "ok", "HTTP 503 no_workers", "in-band upstream_failed", "ClientPayloadError", …
    first_token_s: float | None = None
    answered_s: float = 0.0  # until the status line (for refusals: how fast they came)
    chunks: int = 0  # the fake's tokens received (events may carry several)


@dataclass
class Phase:
    outcomes: list[Outcome] = field(default_factory=list)
    cpu_s: float = 0.0  # API + workers + Redis
    cpu_by_role_s: dict[str, float] = field(default_factory=dict)  # "api", "worker", "redis"
    # CPU per token while every open stream had its first token and none had ended: the cost of
    # streaming alone, without the requests' start and end.
    steady_ms_per_token: float | None = None
    steady_by_role_ms: dict[str, float] = field(default_factory=dict)  # per token: "api", "worker", "redis"
    # Tokens per SSE event in that window: above 1 when a process fell behind and joined text deltas,
    # which makes a token cheaper. CPU per event (per token x this) compares builds at unequal lag.
    steady_tokens_per_event: float | None = None
    rss_per_stream_kb: float | None = None  # API + workers
    rss_by_role_kb: dict[str, float] = field(default_factory=dict)  # per open stream: "api", "worker"

    def summary(self, name: str, count: int) -> str:
        kinds = Counter(o.kind for o in self.outcomes if not o.ok)
        ttft = [o.first_token_s for o in self.outcomes if o.ok and o.first_token_s is not None]
        refusals: dict[str, list[float]] = {}
        for o in self.outcomes:
            if o.kind.startswith("HTTP"):
                refusals.setdefault(o.kind, []).append(o.answered_s)
        chunks = sum(o.chunks for o in self.outcomes)
        line = f"    {name:<8} {sum(o.ok for o in self.outcomes):>5}/{count} whole"
        if ttft:
            line += f", TTFT p50 {percentile(ttft, 50):.2f} s p99 {percentile(ttft, 99):.2f} s"
        if kinds:
            line += ", failures: " + ", ".join(f"{n}× {k}" for k, n in kinds.most_common())
        if refusals:
            line += " (answered within p99: " + ", ".join(
                f"{kind.removeprefix('HTTP ')} {percentile(times, 99) * 1000:.0f} ms"
                for kind, times in refusals.items()) + ")"
        if self.cpu_s and chunks:
            line += f"; CPU {self.cpu_s * 1000 / chunks:.3f} ms/chunk (" + " + ".join(
                f"{role} {seconds * 1000 / chunks:.3f}" for role, seconds in self.cpu_by_role_s.items()) + ")"
        if self.steady_ms_per_token is not None:
            line += f", streaming only {self.steady_ms_per_token:.3f} (" + " + ".join(
                f"{role} {ms:.3f}" for role, ms in self.steady_by_role_ms.items()) + ")"
        if self.steady_tokens_per_event is not None:
            line += f" at {self.steady_tokens_per_event:.2f} tokens/event"
        if self.rss_per_stream_kb is not None:
            line += f"; RSS {self.rss_per_stream_kb:.1f} KB/stream (" + " + ".join(
                f"{role} {kb:.1f}" for role, kb in self.rss_by_role_kb.items()) + ")"
        return line


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def one_stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes,
                     expected: list[str], first_tokens: list[float], received: list[int]) -> Outcome:
    started = time.perf_counter()
    pieces: list[str] = []
    first: float | None = None
    try:
        async with session.post(url, data=body, headers=headers) as response:
            answered = time.perf_counter() - started
            if response.status != 200:
                payload = await response.read()
                try:
                    code = orjson.loads(payload)["error"]["code"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    code = "?"
                return Outcome(False, f"HTTP {response.status} {code}", answered_s=answered)
            done = False
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = orjson.loads(data)
                if "error" in chunk:
                    return Outcome(False, f"in-band {chunk['error'].get('code')}", first, answered, len(pieces))
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if first is None:
                            first = time.perf_counter() - started
                            first_tokens.append(first)
                        pieces.append(content)
                        received[0] += len(content)  # characters: events may carry several tokens
                        received[1] += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(False, type(exc).__name__, first, time.perf_counter() - started, len(pieces))
    text = "".join(pieces)
    whole = done and text == "".join(expected)
    return Outcome(whole, "ok" if whole else "truncated", first, answered, _tokens_in(text, expected))


def _tokens_in(text: str, expected: list[str]) -> int:
    """How many of the expected tokens, in order from the first, the received text holds."""
    held = count = 0
    for token in expected:
        if not text.startswith(token, held):
            break
        held += len(token)
        count += 1
    return count


async def burst(urls: list[str], headers: dict[str, str], body: bytes, count: int, expected: list[str],
                cpu_pids: dict[str, int], memory_pids: dict[str, int], rss_idle_kb: dict[str, int]) -> Phase:
    phase = Phase()
    first_tokens: list[float] = []
    received = [0, 0]  # characters of content, and the events that carried them, received by all streams so far
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        cpu_before = {name: cpu_seconds(pid) for name, pid in cpu_pids.items()}
        tasks = [asyncio.create_task(one_stream(session, url, headers, body, expected, first_tokens, received))
                 for url, _ in zip(itertools.cycle(urls), range(count), strict=False)]
        chars_per_token = len("".join(expected)) / len(expected)
        # At the window's start: CPU of each process, characters and events received, streams open.
        steady: tuple[dict[str, float], int, int, int] | None = None
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.1)
            open_now = sum(1 for t in tasks if not t.done())
            if steady is None and cpu_pids and len(first_tokens) >= open_now > 0:
                steady = ({name: cpu_seconds(pid) for name, pid in cpu_pids.items()}, received[0], received[1],
                          open_now)
            elif steady is not None and phase.steady_ms_per_token is None and open_now < steady[3]:
                # The first stream ended: the window in which every stream only streamed is over.
                tokens = (received[0] - steady[1]) / chars_per_token
                if tokens > 0:
                    phase.steady_tokens_per_event = tokens / max(received[1] - steady[2], 1)
                    for name, pid in cpu_pids.items():
                        role = name.split("-")[0]
                        ms = (cpu_seconds(pid) - steady[0][name]) * 1000 / tokens
                        phase.steady_by_role_ms[role] = phase.steady_by_role_ms.get(role, 0.0) + ms
                    phase.steady_ms_per_token = sum(phase.steady_by_role_ms.values())
            if phase.rss_per_stream_kb is None and memory_pids and len(first_tokens) >= open_now > 0:
                # Every stream still open has its first token: the per-stream state is all there.
                for name, pid in memory_pids.items():
                    role = name.split("-")[0]
                    grown_kb = (rss_kb(pid) - rss_idle_kb[name]) / open_now
                    phase.rss_by_role_kb[role] = phase.rss_by_role_kb.get(role, 0.0) + grown_kb
                phase.rss_per_stream_kb = sum(phase.rss_by_role_kb.values())
        phase.outcomes = [t.result() for t in tasks]
        for name, pid in cpu_pids.items():
            role = name.split("-")[0]
            used_s = cpu_seconds(pid) - cpu_before[name]
            phase.cpu_by_role_s[role] = phase.cpu_by_role_s.get(role, 0.0) + used_s
            phase.cpu_s += used_s
    return phase


async def run(stack: Stack, counts: list[int], chunks: int, interval_ms: float) -> None:
    expected = reply_tokens(AUTO_MODEL, chunks)
    await asyncio.to_thread(stack.fake.set_default, AUTO_MODEL, {"token_interval_s": interval_ms / 1000})
    direct_body = orjson.dumps({"model": AUTO_MODEL, "messages": [{"role": "user", "content": "Count."}],
                                "max_tokens": chunks, "stream": True})
    # text-basic: the capability whose best candidate is the paced model.
    via_body = orjson.dumps({"model": "text-basic", "messages": [{"role": "user", "content": "Count."}],
                             "max_tokens": chunks, "stream": True})
    pids = stack.pids()
    gateway_pids = {role: pid for role, pid in pids.items() if role.startswith(("api", "worker", "redis"))}
    # Memory per stream: API and workers (Redis grows with the queue, not per open stream).
    memory_pids = {role: pid for role, pid in pids.items() if role.startswith(("api", "worker"))}
    # Against the processes' size before the first burst: Python keeps memory it freed, so growth
    # from just before a burst would not count what an earlier, smaller burst left allocated.
    rss_idle_kb = {role: rss_kb(pid) for role, pid in memory_pids.items()}
    print(f"bench.concurrent_streams: {chunks} chunks {interval_ms:g} ms apart "
          f"({chunks * interval_ms / 1000:g} s an answer), {len(stack.gateway.apis)} API(s), "
          f"{len(stack.gateway.workers)} worker(s), open files {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}",
          flush=True)
    via_urls = [stack.gateway.url(i) + "/v1/chat/completions" for i in range(len(stack.gateway.apis))]
    for count in counts:
        print(f"  N = {count} (load {load_average()})", flush=True)
        direct = await burst([stack.direct_url], {"Authorization": DIRECT_AUTH, "Content-Type": "application/json"},
                             direct_body, count, expected, {}, {}, {})
        print(direct.summary("direct", count), flush=True)
        via = await burst(via_urls, {"Authorization": f"Bearer {stack.key}",
                                              "Content-Type": "application/json"},
                          via_body, count, expected, gateway_pids, memory_pids, rss_idle_kb)
        print(via.summary("gateway", count), flush=True)
        await asyncio.sleep(2)  # let the last connections close before the next burst


def raise_open_files_limit() -> None:
    """Soft limit on open files up to the hard one (inherited by the processes started from here)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def default_timeouts_catalog(upstream_url: str) -> str:
    """The tests' catalog with the providers' default timeouts (the tests shorten them to 1-2 s)."""
    providers = [{"id": "fake-a", "base_url": upstream_url, "api_keys_env": ["FAKE_A_KEY"]},
                 {"id": "fake-b", "base_url": upstream_url, "requires_key": False}]
    return catalog_yaml(upstream_url, providers=providers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="100,500,1000,2000,5000")
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--interval-ms", type=float, default=250.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--apis", type=int, default=1, help="API replicas on the one Redis")
    parser.add_argument("--repo", type=Path, default=None, help="run the gateway from another checkout")
    parser.add_argument("--env", action="append", default=[], help="extra gateway setting NAME=VALUE")
    args = parser.parse_args()
    env: dict[str, Any] = dict(item.split("=", 1) for item in args.env)
    # One key opens every stream here; the per-key stream cap is not what is measured.
    env.setdefault("FREEFERENCE_MAX_STREAMS_PER_KEY", "100000")
    # The product's defaults, where the harness (built for tests) sets shorter ones.
    for name in ("pickup_timeout_s", "request_timeout_s"):
        env.setdefault(f"FREEFERENCE_{name.upper()}", str(Settings.model_fields[name].default))
    raise_open_files_limit()
    with running_stack(workers=args.workers, apis=args.apis, repo=args.repo, catalog=default_timeouts_catalog,
                       **env) as stack:
        uvloop.run(run(stack, [int(n) for n in args.counts.split(",")], args.chunks, args.interval_ms))


if __name__ == "__main__":
    main()
