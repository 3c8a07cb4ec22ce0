"""What per-key auth + limits + usage accounting add to a request, at 1 and 32 in flight.

    python -m bench.limiter_bench [--rounds 5] [--requests 300] [--concurrency 1,32] [--json PATH]

One run starts its own Valkey, fake upstream, one API and two workers (bench/harness.py) and
measures two things side by side, alternating A/B blocks each round so load hits both alike:

1. Redis calls, from this process over one connection pool (as an API process makes them):
   `auth only` = the record GET a key lookup costs without limits (lookup_key);
   `admission` = the Lua call that authenticates and charges rpm + tpm + rpd (Gatekeeper.admit);
   `usage write` = the pipelined per-key/day/model write + tokens correction after a request.
2. The whole request through the gateway (non-streaming, fake upstream with no delay):
   the master key (no key lookup, no limits, no usage write) against a user key (admission
   before the job, usage write when `done` arrives); the difference is what the feature adds.

Prints p50/p99 per cell as the median over rounds, with the range of the difference.
"""

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson
import uvloop
from redis.asyncio import Redis

from api.admission import Admission, Gatekeeper
from api.keys import KeyLimits, create_key, lookup_key
from api.usage import UsageRecorder
from bench.gateway_overhead import run_block
from bench.harness import Stack, Target, load_average, percentile, running_stack, targets
from settings import Settings
from workers.protocol import DoneEvent, RouteInfo

MASTER_KEY = "test-master-key-0123456789"  # what tests.support.processes.base_env configures
HUGE = 10**12  # limits no benchmark reaches: every call is admitted and charged in full


@dataclass
class Cell:
    """Medians over rounds for one A/B comparison at one concurrency (milliseconds)."""

    what: str
    concurrency: int
    rounds: int
    calls_per_block: int
    a_name: str
    b_name: str
    a_p50_ms: float
    a_p99_ms: float
    b_p50_ms: float
    b_p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    added_p50_range_ms: tuple[float, float]
    load: str


async def _closed_loop(call: Callable[[], Awaitable[object]], concurrency: int, n: int) -> list[float]:
    todo = iter(range(n))
    latencies: list[float] = []

    async def lane() -> None:
        for _ in todo:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return latencies


def _cell(what: str, concurrency: int, n: int, names: tuple[str, str],
          rounds: list[tuple[list[float], list[float]]]) -> Cell:
    def med(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 3)

    a50 = [percentile(a, 50) for a, _ in rounds]
    a99 = [percentile(a, 99) for a, _ in rounds]
    b50 = [percentile(b, 50) for _, b in rounds]
    b99 = [percentile(b, 99) for _, b in rounds]
    d50 = [b - a for a, b in zip(a50, b50, strict=True)]
    d99 = [b - a for a, b in zip(a99, b99, strict=True)]
    return Cell(what, concurrency, len(rounds), n, names[0], names[1], med(a50), med(a99), med(b50), med(b99),
                med(d50), med(d99), (round(min(d50) * 1000, 3), round(max(d50) * 1000, 3)), load_average())


async def redis_cells(stack: Stack, concurrencies: list[int], rounds: int, n: int) -> list[Cell]:
    """auth-only GET vs the admission script; and the usage write on its own."""
    settings = Settings(redis_url=stack.redis_url)
    cells: list[Cell] = []
    async with Redis.from_url(stack.redis_url, max_connections=64) as redis:
        key, _ = await create_key(redis, name="limiter-bench", tier="pro", limits=KeyLimits(rpm=HUGE, tpm=HUGE,
                                                                                             rpd=HUGE))
        gate = Gatekeeper(redis, settings)
        record, decision = await gate.admit(key, 25)
        done = DoneEvent(route=RouteInfo(model="general-best", provider="fake-a", attempts=1),
                         usage={"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28})

        async def auth_only() -> object:
            return await lookup_key(redis, key)

        async def admission() -> object:
            return await gate.admit(key, 25)

        async def usage_write() -> None:
            recorder = UsageRecorder(redis, Admission(record, decision, 25, time.time()), retention_days=1)
            await recorder.succeeded(done)

        for concurrency in concurrencies:
            per_round: list[tuple[list[float], list[float]]] = []
            writes: list[tuple[list[float], list[float]]] = []
            await _closed_loop(admission, concurrency, n)  # warm-up: script cache, pool
            for i in range(rounds):
                order = (auth_only, admission) if i % 2 == 0 else (admission, auth_only)
                timed = {fn: await _closed_loop(fn, concurrency, n) for fn in order}
                per_round.append((timed[auth_only], timed[admission]))
                writes.append(([0.0], await _closed_loop(usage_write, concurrency, n)))
            cells.append(_cell("redis: auth only → admission", concurrency, n, ("auth only", "admission"),
                               per_round))
            cells.append(_cell("redis: usage write", concurrency, n, ("-", "usage write"), writes))
    return cells


async def redis_cpu_us(stack: Stack, calls: int = 3000) -> dict[str, float]:
    """Redis's own CPU per call (INFO commandstats), which the machine's load barely moves."""
    settings = Settings(redis_url=stack.redis_url)
    out: dict[str, float] = {}
    async with Redis.from_url(stack.redis_url) as redis:
        key, _ = await create_key(redis, name="cpu-bench", tier="pro", limits=KeyLimits(rpm=HUGE, tpm=HUGE, rpd=HUGE))
        gate = Gatekeeper(redis, settings)
        record, decision = await gate.admit(key, 25)
        done = DoneEvent(route=RouteInfo(model="general-best", provider="fake-a", attempts=1),
                         usage={"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28})
        steps: dict[str, Callable[[], Awaitable[object]]] = {
            "auth only (GET)": lambda: lookup_key(redis, key),
            "admission (script)": lambda: gate.admit(key, 25),
            "usage write (pipeline)": lambda: UsageRecorder(
                redis, Admission(record, decision, 25, time.time()), retention_days=1).succeeded(done),
        }
        for name, step in steps.items():
            await redis.config_resetstat()
            for _ in range(calls):
                await step()
            stats = await redis.info("commandstats")
            used_us = sum(v["usec"] for k, v in stats.items() if k != "cmdstat_config")
            out[name] = round(used_us / calls, 2)
    return out


async def gateway_cells(stack: Stack, concurrencies: list[int], rounds: int, n: int) -> list[Cell]:
    """The same request through the gateway: master key (no limits) vs a user key (limits + usage)."""
    _, user = targets(stack)
    master = Target("master", user.url, {**user.headers, "Authorization": f"Bearer {MASTER_KEY}"}, user.model,
                    user.upstream_model)
    cells: list[Cell] = []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        for concurrency in concurrencies:
            blocks = max(n, 10 * concurrency)
            for target in (master, user):
                await run_block(client, target, False, concurrency, blocks // 4)
            per_round: list[tuple[list[float], list[float]]] = []
            failures = 0
            for i in range(rounds):
                order = (master, user) if i % 2 == 0 else (user, master)
                timed = {t.name: await run_block(client, t, False, concurrency, blocks) for t in order}
                failures += timed["master"].failures + timed[user.name].failures
                per_round.append((timed["master"].latencies_s, timed[user.name].latencies_s))
            if failures:
                raise RuntimeError(f"{failures} gateway requests failed; the numbers would mean nothing")
            cells.append(_cell("gateway: whole request", concurrency, blocks, ("no limits", "limits+usage"),
                               per_round))
    return cells


def print_cells(cells: list[Cell]) -> None:
    """A fixed-width table; 'added' = B − A (for the usage write: B itself)."""
    header = (f"{'what':<32} {'conc':>4} {'A':>10} {'A p50/p99':>15} {'B':>13} {'B p50/p99':>15} "
              f"{'added p50':>9} {'added p99':>9} {'added p50 range':>17}  load")
    print(header)
    print("-" * len(header))
    for c in cells:
        print(f"{c.what:<32} {c.concurrency:>4} {c.a_name:>10} {c.a_p50_ms:>7.3f}/{c.a_p99_ms:<7.3f} "
              f"{c.b_name:>13} {c.b_p50_ms:>7.3f}/{c.b_p99_ms:<7.3f} {c.added_p50_ms:>9.3f} {c.added_p99_ms:>9.3f} "
              f"{c.added_p50_range_ms[0]:>8.3f}..{c.added_p50_range_ms[1]:<7.3f}  {c.load}")


def main() -> None:
    """Run the benchmark and print (and optionally save) the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="calls per block (at least 10 x concurrency)")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    uvloop.install()
    with running_stack(workers=2) as stack:
        print(f"load before: {load_average()}", flush=True)
        cpu = asyncio.run(redis_cpu_us(stack))
        cells = asyncio.run(redis_cells(stack, concurrencies, args.rounds, args.requests))
        cells += asyncio.run(gateway_cells(stack, concurrencies, args.rounds, args.requests))
    print()
    print("Redis CPU per call (µs, INFO commandstats; inner calls of a script included):",
          ", ".join(f"{name} {us}" for name, us in cpu.items()))
    print()
    print_cells(cells)
    if args.json:
        result = {"redis_cpu_us_per_call": cpu, "cells": [asdict(c) for c in cells]}
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
