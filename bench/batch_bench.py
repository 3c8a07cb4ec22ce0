"""Batch throughput, and what a running batch costs concurrent live requests.

    python -m bench.batch_bench [--lines 10000] [--latency-ms 50] [--workers 2] [--probes 200] [--json PATH]

One stack (private Valkey, fake upstream answering every call after --latency-ms, one API,
--workers workers). Live probes are non-streaming chat requests sent one at a time through the
gateway; each answer is checked token by token. Phases, in one run:
  1. baseline: --probes live requests with nothing else running;
  2. batch: upload and create a --lines batch, then send live probes until it ends; the batch's
     lines/second is measured from create to the terminal status; every custom_id must appear
     exactly once in output ∪ error file;
  3. baseline again (brackets drift on a shared machine).
Added latency = batch-phase percentile minus the mean of the two baseline percentiles.
"""

import argparse
import collections
import time
from typing import Any

import httpx
import orjson
import uvloop
from redis import Redis

from bench.harness import BadAnswer, Stack, cpu_seconds, load_average, percentile, running_stack, targets, timed_call
from tests.support.processes import batch_jsonl

PROBE_TOKENS = 16


def _latency(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), **{f"p{q}_ms": round(percentile(samples, q) * 1000, 2) for q in (50, 95, 99)}}


async def _probe(client: httpx.AsyncClient, stack: Stack) -> float:
    _, via = targets(stack)
    return await timed_call(client, via, stream=False, max_tokens=PROBE_TOKENS)


async def baseline(client: httpx.AsyncClient, stack: Stack, probes: int) -> list[float]:
    """Live request latency with nothing else running."""
    return [await _probe(client, stack) for _ in range(probes)]


async def batch_phase(client: httpx.AsyncClient, stack: Stack, lines: int) -> dict[str, Any]:
    """Run one batch to the end while probing live latency; verify every line is there once."""
    api = stack.gateway.base_url + "/v1"
    auth = {"Authorization": f"Bearer {stack.key}"}
    content = batch_jsonl(lines, max_tokens=PROBE_TOKENS)
    started = time.perf_counter()
    uploaded = (await client.post(api + "/files", headers=auth, data={"purpose": "batch"},
                                  files={"file": ("bench.jsonl", content)})).json()
    upload_s = time.perf_counter() - started
    created_at = time.perf_counter()
    batch = (await client.post(api + "/batches", headers=auth, json={
        "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})).json()
    create_s = time.perf_counter() - created_at
    cpu_before = {role: cpu_seconds(pid) for role, pid in stack.pids().items()}
    commands_before = _redis_commands(stack)
    live: list[float] = []
    errors: list[str] = []
    next_poll = 0.0
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        try:
            live.append(await _probe(client, stack))
        except BadAnswer as exc:
            errors.append(str(exc))
        if time.perf_counter() >= next_poll:
            batch = (await client.get(f"{api}/batches/{batch['id']}", headers=auth)).json()
            next_poll = time.perf_counter() + 0.5
    elapsed_s = time.perf_counter() - created_at
    cpu = {role: round(cpu_seconds(pid) - cpu_before[role], 1) for role, pid in stack.pids().items()}
    commands = _redis_commands(stack) - commands_before
    ids: collections.Counter[str] = collections.Counter()
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key):
            raw = (await client.get(f"{api}/files/{batch[key]}/content", headers=auth)).content
            ids.update(orjson.loads(line)["custom_id"] for line in raw.splitlines() if line)
    exactly_once = ids == collections.Counter(f"req-{i}" for i in range(lines))
    return {"status": batch["status"], "request_counts": batch["request_counts"], "exactly_once": exactly_once,
            "upload_s": round(upload_s, 2), "create_and_validate_s": round(create_s, 2),
            "elapsed_s": round(elapsed_s, 2), "lines_per_s": round(lines / elapsed_s, 1),
            "live": live, "live_errors": errors, "cpu_s": cpu,
            "cpu_ms_per_line": {role: round(v * 1000 / lines, 2) for role, v in cpu.items()},
            "redis_commands_per_line": round(commands / lines, 1)}


def _redis_commands(stack: Stack) -> int:
    with Redis.from_url(stack.redis_url) as redis:
        return int(redis.info("stats")["total_commands_processed"])


async def run(stack: Stack, lines: int, probes: int) -> dict[str, Any]:
    """All three phases; prints and returns the results."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, read=600.0)) as client:
        for _ in range(20):  # warm connections and the route's health state
            await _probe(client, stack)
        before = await baseline(client, stack, probes)
        print(f"baseline (before): {_latency(before)}", flush=True)
        result = await batch_phase(client, stack, lines)
        live = result.pop("live")
        print(f"batch: { {k: v for k, v in result.items()} }", flush=True)
        print(f"live during batch: {_latency(live)}", flush=True)
        after = await baseline(client, stack, probes)
        print(f"baseline (after): {_latency(after)}", flush=True)
    base = {q: (percentile(before, q) + percentile(after, q)) / 2 for q in (50, 95, 99)}
    added = {f"p{q}_ms": round((percentile(live, q) - base[q]) * 1000, 2) for q in (50, 95, 99)} if live else {}
    print(f"added live latency while the batch runs: {added}", flush=True)
    return {"batch": result, "baseline_before": _latency(before), "baseline_after": _latency(after),
            "live_during_batch": _latency(live) if live else {}, "added_latency": added}


def main(argv: list[str] | None = None) -> None:
    """Start the stack and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--worker-concurrency", type=int, help="FREEFERENCE_BATCH_WORKER_CONCURRENCY")
    parser.add_argument("--lag-target-ms", type=float, help="FREEFERENCE_BATCH_LOOP_LAG_TARGET_MS (0: no pacing)")
    parser.add_argument("--json", type=str, help="also write the results here")
    args = parser.parse_args(argv)
    print(f"load average at start: {load_average()}", flush=True)
    env = {"FREEFERENCE_BATCH_MAX_LINES": str(max(args.lines, 50_000))}
    if args.worker_concurrency:
        env["FREEFERENCE_BATCH_WORKER_CONCURRENCY"] = str(args.worker_concurrency)
    if args.lag_target_ms is not None:
        env["FREEFERENCE_BATCH_LOOP_LAG_TARGET_MS"] = str(args.lag_target_ms)
    with running_stack(workers=args.workers, **env) as stack:
        # Every upstream call (batch lines and live probes alike) waits this long, like a real provider.
        stack.fake.set_default("*", {"delay_s": args.latency_ms / 1000})
        result = uvloop.run(run(stack, args.lines, args.probes))
    result["load_average_end"] = load_average()
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
