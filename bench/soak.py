"""Soak test: hundreds of concurrent clients against 2 API + 2 worker processes for minutes.

    python -m bench.soak [--duration-s 180] [--clients 200] [--stream-share 0.5] [--fault-every-s 2]
                         [--report PATH]

Bounded in time; not part of the test suite. Every client loops: one request (streaming or
not, through API replica `i % 2`), a check of the whole answer against the fake's numbered
tokens of the model that served it (from `model` / `x-freeference-model`), a short pause.
Faults are injected into the fake's script for the primary model all along (5xx, connection
resets, 429s, slow answers); the gateway must absorb them before the first token, so the
only acceptable outcome is a whole, in-order answer. Resident memory of every gateway
process and of Redis is sampled every few seconds; after the warm-up it should be flat.

Prints (and with --report writes) a Markdown report: requests, outcomes, p50/p99 latencies,
and memory at the end of warm-up, at the end, and its slope.
"""

import argparse
import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import reply_tokens
from bench.harness import (
    AUTO_MODEL,
    BadAnswer,
    check_stream,
    cpu_seconds,
    load_average,
    percentile,
    running_stack,
)

FAULTS = (
    {"status": 503},
    {"status": 500},
    {"reset": True},
    {"status": 429, "retry_after": 0},
    {"delay_s": 0.3},
)


@dataclass
class Results:
    outcomes: Counter[str] = field(default_factory=Counter)
    served_by: Counter[str] = field(default_factory=Counter)
    complete_s: list[float] = field(default_factory=list)  # non-streaming: whole answer
    first_token_s: list[float] = field(default_factory=list)  # streaming: first SSE event
    stream_s: list[float] = field(default_factory=list)  # streaming: whole stream
    tokens: int = 0
    faults_injected: int = 0
    errors: list[str] = field(default_factory=list)
    hops: list[str] = field(default_factory=list)  # the gateway's own histograms, from /metrics


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MB (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (m - mean_m) for t, m in samples)
    return cov / var * 60 if var else 0.0


async def one_request(client: httpx.AsyncClient, url: str, key: str, stream: bool, max_tokens: int,
                      results: Results) -> None:
    body = orjson.dumps({"messages": [{"role": "user", "content": "Count for the soak test."}],
                         "max_tokens": max_tokens, "stream": stream})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    started = time.perf_counter()
    if not stream:
        response = await client.post(url, content=body, headers=headers)
        if response.status_code != 200:
            raise BadAnswer(f"HTTP {response.status_code} {response.text[:200]}")
        completion = orjson.loads(response.content)
        served = completion["model"]
        if completion["choices"][0]["message"]["content"] != "".join(reply_tokens(served, max_tokens)):
            raise BadAnswer("non-streaming content differs from the served model's tokens")
        results.complete_s.append(time.perf_counter() - started)
    else:
        first_s: float | None = None
        received = bytearray()
        async with client.stream("POST", url, content=body, headers=headers) as response:
            if response.status_code != 200:
                raise BadAnswer(f"HTTP {response.status_code} {(await response.aread())[:200]!r}")
            served = response.headers["x-freeference-model"]
            async for raw in response.aiter_raw():
                if first_s is None and b"data:" in raw:
                    first_s = time.perf_counter() - started
                received += raw
        check_stream(bytes(received), reply_tokens(served, max_tokens))
        results.first_token_s.append(first_s or 0.0)
        results.stream_s.append(time.perf_counter() - started)
    results.tokens += max_tokens
    results.served_by[served] += 1


async def client_loop(i: int, urls: list[str], keys: list[str], args: argparse.Namespace, stop_at: float,
                      results: Results) -> None:
    rng = random.Random(i)
    url = urls[i % len(urls)] + "/v1/chat/completions"
    key = keys[i % len(keys)]
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() < stop_at:
            stream = rng.random() < args.stream_share
            try:
                await one_request(client, url, key, stream, args.tokens, results)
                results.outcomes["ok_stream" if stream else "ok"] += 1
            except (BadAnswer, httpx.HTTPError, KeyError, orjson.JSONDecodeError) as exc:
                results.outcomes["error"] += 1
                if len(results.errors) < 20:
                    results.errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(rng.uniform(0, args.think_ms / 1000))


async def inject_faults(fake_root: str, every_s: float, stop_at: float, results: Results) -> None:
    """Keep a few faults queued in the fake's script for the primary model."""
    rng = random.Random(7)
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < stop_at:
            faults = [rng.choice(FAULTS) for _ in range(3)]
            await client.post(fake_root + "/_control/script", json={"model": AUTO_MODEL, "faults": faults})
            results.faults_injected += len(faults)
            await asyncio.sleep(every_s)


async def sample_memory(pids: dict[str, int], every_s: float, stop_at: float,
                        samples: dict[str, list[tuple[float, float]]]) -> None:
    started = time.monotonic()
    while time.monotonic() < stop_at:
        for role, pid in pids.items():
            samples.setdefault(role, []).append((time.monotonic() - started, rss_mb(pid)))
        await asyncio.sleep(every_s)


def soak(args: argparse.Namespace) -> str:
    """Start the stack (outside any event loop: key creation runs its own), then drive it."""
    # Production defaults for the deadlines (the test environment shortens them).
    with running_stack(workers=2, keep_logs=True, FREEFERENCE_REQUEST_TIMEOUT_S="60",
                       FREEFERENCE_PICKUP_TIMEOUT_S="5") as stack:
        stack.gateway.start_api()
        stack.gateway.wait_ready(2)
        # Paced tokens so streams stay open (hundreds in flight at once); 20 clients per key.
        stack.fake.set_default(AUTO_MODEL, {"token_interval_s": args.token_interval_ms / 1000})
        keys = [stack.gateway.create_key("pro", name=f"soak-{k}") for k in range(max(args.clients // 20, 1))]
        urls = [stack.gateway.url(r) for r in range(2)]
        pids = stack.pids()
        return uvloop.run(drive(args, urls, keys, stack.fake.root, pids, str(stack.log_dir)))


async def drive(args: argparse.Namespace, urls: list[str], keys: list[str], fake_root: str, pids: dict[str, int],
                log_dir: str) -> str:
    results = Results()
    samples: dict[str, list[tuple[float, float]]] = {}
    started = time.monotonic()
    stop_at = started + args.duration_s
    load_before = load_average()
    cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()} | {"soak client": _own_cpu_s()}
    await asyncio.gather(
        *(client_loop(i, urls, keys, args, stop_at, results) for i in range(args.clients)),
        inject_faults(fake_root, args.fault_every_s, stop_at, results),
        sample_memory({k: v for k, v in pids.items() if k != "fake"}, args.sample_s, stop_at + 1, samples),
    )
    elapsed = time.monotonic() - started
    results.hops = await gateway_hops(urls)
    cpu_after = {role: cpu_seconds(pid) for role, pid in pids.items()} | {"soak client": _own_cpu_s()}
    cpu_share = {role: (cpu_after[role] - cpu_before[role]) / elapsed for role in cpu_before}
    return report(args, results, samples, elapsed, load_before, log_dir, cpu_share)


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


HOPS = (("queue wait (enqueue → worker accepted)", "freeference_queue_wait_seconds", ()),
        ("gateway overhead, non-streaming", "freeference_gateway_overhead_seconds", (("kind", "complete"),)),
        ("gateway overhead, first token", "freeference_gateway_overhead_seconds", (("kind", "first_token"),)))


async def gateway_hops(urls: list[str]) -> list[str]:
    """p50/p99 (histogram bucket bounds) of where the gateway's time went, over both replicas."""
    buckets: dict[tuple[str, tuple[tuple[str, str], ...]], dict[float, float]] = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for url in urls:
            text = (await client.get(url + "/metrics")).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name.endswith("_bucket"):
                        labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                        into = buckets.setdefault((sample.name.removesuffix("_bucket"), labels), {})
                        bound = float(sample.labels["le"])
                        into[bound] = into.get(bound, 0.0) + sample.value
    lines = []
    for title, name, labels in HOPS:
        cumulative = sorted(buckets.get((name, labels), {}).items())
        if not cumulative or not cumulative[-1][1]:
            continue
        count = cumulative[-1][1]

        def upper_bound(q: float, cumulative: list[tuple[float, float]] = cumulative, count: float = count) -> str:
            le = next(b for b, c in cumulative if c >= q * count)
            return "> 1 s" if le == float("inf") else f"≤ {le * 1000:g} ms"

        lines.append(f"- {title}: p50 {upper_bound(0.5)}, p99 {upper_bound(0.99)} ({count:.0f} requests)")
    return lines


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f}" if values else "-"


def report(args: argparse.Namespace, r: Results, samples: dict[str, list[tuple[float, float]]], elapsed: float,
           load_before: str, log_dir: str, cpu_share: dict[str, float]) -> str:
    total = sum(r.outcomes.values())
    lines = [
        f"Soak: {args.clients} clients ({args.stream_share:.0%} streaming, {args.tokens} tokens, "
        f"{args.token_interval_ms:g} ms/token), 2 API + 2 worker processes, {elapsed:.0f} s; "
        f"load average before {load_before}, after {load_average()}.",
        "",
        f"- requests: {total} ({total / elapsed:.0f}/s), tokens checked: {r.tokens}",
        f"- outcomes: {dict(r.outcomes)}; served by: {dict(r.served_by)}",
        f"- faults injected into the primary model: {r.faults_injected}",
        f"- non-streaming answer p50/p99: {_ms(r.complete_s, 50)}/{_ms(r.complete_s, 99)} ms",
        f"- streaming first token p50/p99: {_ms(r.first_token_s, 50)}/{_ms(r.first_token_s, 99)} ms; "
        f"whole stream p50/p99: {_ms(r.stream_s, 50)}/{_ms(r.stream_s, 99)} ms",
        *r.hops,
        "- CPU (cores) over the run: " + ", ".join(f"{role} {share:.2f}" for role, share in sorted(cpu_share.items())),
        "",
        "| process | RSS after warm-up (MB) | RSS at end (MB) | max (MB) | slope after warm-up (MB/min) |",
        "|---|---|---|---|---|",
    ]
    for role, points in sorted(samples.items()):
        after = [(t, m) for t, m in points if t >= args.warmup_s] or points
        lines.append(f"| {role} | {after[0][1]:.1f} | {points[-1][1]:.1f} | {max(m for _, m in points):.1f} | "
                     f"{slope_mb_per_min(after):+.2f} |")
    if r.errors:
        lines += ["", "First errors:", *(f"- {e}" for e in r.errors)]
    lines += ["", f"(logs: {log_dir})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=180)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-interval-ms", type=float, default=25)
    parser.add_argument("--think-ms", type=float, default=200)
    parser.add_argument("--fault-every-s", type=float, default=2)
    parser.add_argument("--warmup-s", type=float, default=30)
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--report", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    text = soak(args)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
