"""Added latency and throughput of the gateway over calling the upstream directly.

    python -m bench.gateway_overhead [--rounds 7] [--requests 200] [--concurrency 1,8,32]
                                     [--workers 2] [--streams] [--json PATH]

One invocation starts its own Valkey, fake upstream (zero added latency), one API process and
N worker processes, then runs the same closed-loop load against the fake directly and
through the gateway. The two alternate block by block (direct first in even rounds, gateway
first in odd ones) so a noisy neighbour hits both alike. Per round it takes p50/p99 of each
side and their difference; it prints the median over the rounds and the range, beside the
load average. `--streams` adds the scenario of bench/streams_load.py in the same stack.
"""

import argparse
import asyncio
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import orjson
import uvloop

from bench import streams_load
from bench.harness import (
    BadAnswer,
    Stack,
    Target,
    cpu_seconds,
    load_average,
    percentile,
    redis_commands,
    running_stack,
    targets,
    timed_call,
    upstream_calls,
)

MAX_TOKENS = 16


@dataclass
class Block:
    """One closed-loop burst against one target."""

    latencies_s: list[float]
    elapsed_s: float
    failures: int

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.elapsed_s


@dataclass
class Row:
    """Medians over rounds for one (mode, concurrency) cell, with the spread and the machine load."""

    mode: str
    concurrency: int
    rounds: int
    requests_per_block: int
    direct_p50_ms: float
    direct_p99_ms: float
    gateway_p50_ms: float
    gateway_p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    added_p50_range_ms: tuple[float, float]
    added_p99_range_ms: tuple[float, float]
    direct_rps: float
    gateway_rps: float
    throughput_ratio: float
    failures: int
    load_before: str
    load_after: str
    lost_or_duplicated: int = 0
    # CPU (user + system) each process class spent per gateway request, over the gateway blocks:
    # unlike latency, this barely moves with the machine's load.
    gateway_cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    # Redis commands per gateway request, by command (INFO commandstats over the gateway blocks).
    redis_commands_per_request: dict[str, float] = field(default_factory=dict)


async def run_block(client: httpx.AsyncClient, target: Target, stream: bool, concurrency: int, n: int) -> Block:
    """`n` requests with `concurrency` in flight at any time."""
    todo = iter(range(n))
    latencies: list[float] = []
    failures = 0

    async def lane() -> None:
        nonlocal failures
        for _ in todo:
            try:
                latencies.append(await timed_call(client, target, stream, MAX_TOKENS))
            except (BadAnswer, httpx.HTTPError):
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return Block(latencies, time.perf_counter() - started, failures)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _cpu_by_role(stack: Stack) -> dict[str, float]:
    """CPU seconds so far, summed per process class (api, worker, redis, fake)."""
    totals: dict[str, float] = {}
    for role, pid in stack.pids().items():
        kind = role.split("-")[0]
        totals[kind] = totals.get(kind, 0.0) + cpu_seconds(pid)
    return totals


async def measure_cell(stack: Stack, client: httpx.AsyncClient, stream: bool, concurrency: int, rounds: int,
                       requests: int) -> Row:
    """Warm up, then `rounds` interleaved rounds of direct and gateway blocks."""
    direct, via = targets(stack)
    n = max(requests, 20 * concurrency)
    await asyncio.to_thread(stack.fake.reset)
    load_before = load_average()
    warm = max(n // 4, 2 * concurrency)
    for target in (direct, via):  # warm-up: connections, pools, caches
        await run_block(client, target, stream, concurrency, warm)
    per_round: list[tuple[Block, Block]] = []
    gateway_cpu_s: dict[str, float] = {}
    commands: dict[str, int] = {}
    for i in range(rounds):
        order = (direct, via) if i % 2 == 0 else (via, direct)
        blocks = {}
        for target in order:
            cpu_before = _cpu_by_role(stack)
            commands_before = await redis_commands(stack.redis_url)
            blocks[target.name] = await run_block(client, target, stream, concurrency, n)
            if target is via:
                for kind, used in _cpu_by_role(stack).items():
                    gateway_cpu_s[kind] = gateway_cpu_s.get(kind, 0.0) + used - cpu_before[kind]
                for command, calls in (await redis_commands(stack.redis_url)).items():
                    commands[command] = commands.get(command, 0) + calls - commands_before.get(command, 0)
        per_round.append((blocks["direct"], blocks["gateway"]))
    sent = {"direct": warm + rounds * n, "gateway": warm + rounds * n}
    seen = await asyncio.to_thread(upstream_calls, stack.fake)
    lost_or_duplicated = sum(abs(seen[name] - sent[name]) for name in sent)

    def med(values: list[float]) -> float:
        return _ms(statistics.median(values))

    d50 = [percentile(d.latencies_s, 50) for d, _ in per_round]
    d99 = [percentile(d.latencies_s, 99) for d, _ in per_round]
    g50 = [percentile(g.latencies_s, 50) for _, g in per_round]
    g99 = [percentile(g.latencies_s, 99) for _, g in per_round]
    a50 = [g - d for g, d in zip(g50, d50, strict=True)]
    a99 = [g - d for g, d in zip(g99, d99, strict=True)]
    ratios = [g.rate / d.rate for d, g in per_round]
    return Row(
        mode="stream TTFT" if stream else "non-stream", concurrency=concurrency, rounds=rounds,
        requests_per_block=n,
        direct_p50_ms=med(d50), direct_p99_ms=med(d99), gateway_p50_ms=med(g50), gateway_p99_ms=med(g99),
        added_p50_ms=med(a50), added_p99_ms=med(a99),
        added_p50_range_ms=(_ms(min(a50)), _ms(max(a50))), added_p99_range_ms=(_ms(min(a99)), _ms(max(a99))),
        direct_rps=round(statistics.median(d.rate for d, _ in per_round), 1),
        gateway_rps=round(statistics.median(g.rate for _, g in per_round), 1),
        throughput_ratio=round(statistics.median(ratios), 3),
        failures=sum(d.failures + g.failures for d, g in per_round),
        load_before=load_before, load_after=load_average(), lost_or_duplicated=lost_or_duplicated,
        gateway_cpu_ms_per_request={k: round(v * 1000 / (rounds * n), 3) for k, v in gateway_cpu_s.items()},
        # Minus the one INFO of each block's own measurement.
        redis_commands_per_request={k: round((v - (rounds if k == "info" else 0)) / (rounds * n), 2)
                                    for k, v in sorted(commands.items(), key=lambda kv: -kv[1]) if v},
    )


def _cpu_text(row: Row) -> str:
    cpu = row.gateway_cpu_ms_per_request
    return f"{cpu.get('api', 0):.2f}+{cpu.get('worker', 0):.2f}+{cpu.get('redis', 0):.2f}"


def _commands(row: Row) -> float:
    return sum(row.redis_commands_per_request.values())


def print_table(rows: list[Row]) -> None:
    """The results as a fixed-width table (milliseconds; added = gateway − direct)."""
    header = (f"{'mode':<12} {'conc':>4} {'direct p50/p99':>15} {'gateway p50/p99':>16} {'added p50':>10} "
              f"{'added p99':>10} {'added p50 range':>17} {'req/s d→gw':>14} {'ratio':>6} {'fail':>4} "
              f"{'lost/dup':>8}  {'CPU ms/req api+wrk+redis':>24} {'cmds/req':>8}  load before → after")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.mode:<12} {r.concurrency:>4} {r.direct_p50_ms:>7.2f}/{r.direct_p99_ms:<7.2f} "
              f"{r.gateway_p50_ms:>7.2f}/{r.gateway_p99_ms:<8.2f} {r.added_p50_ms:>10.2f} {r.added_p99_ms:>10.2f} "
              f"{r.added_p50_range_ms[0]:>8.2f}..{r.added_p50_range_ms[1]:<7.2f} "
              f"{r.direct_rps:>6.0f}→{r.gateway_rps:<7.0f} {r.throughput_ratio:>6.2f} {r.failures:>4} "
              f"{r.lost_or_duplicated:>8}  {_cpu_text(r):>24} {_commands(r):>8.1f}  {r.load_before} → {r.load_after}")


async def run(stack: Stack, args: argparse.Namespace) -> dict[str, object]:
    """Every cell of the matrix, then (optionally) the streams scenario."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    rows: list[Row] = []
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        for concurrency in args.concurrency:
            for stream in (False, True):
                row = await measure_cell(stack, client, stream, concurrency, args.rounds, args.requests)
                rows.append(row)
                print(f"  measured {row.mode} c={concurrency}: added p50 {row.added_p50_ms:.2f} ms, "
                      f"p99 {row.added_p99_ms:.2f} ms (load {row.load_after})", flush=True)
    print()
    print_table(rows)
    print("\nRedis commands per gateway request (c=1):")
    for row in rows:
        if row.concurrency == min(args.concurrency):
            print(f"  {row.mode}: {row.redis_commands_per_request}")
    result: dict[str, object] = {"overhead": [asdict(r) for r in rows]}
    if args.streams:
        result["streams"] = await streams_load.run(stack, rounds=args.stream_rounds)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per cell (median reported)")
    parser.add_argument("--requests", type=int, default=200, help="requests per block (at least 20 × concurrency)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--streams", action="store_true", help="also run the 100-streams scenario")
    parser.add_argument("--stream-rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs (path printed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start the stack, measure, print (and optionally save) the results."""
    args = parse_args(argv)
    print(f"load average at start: {load_average()}", flush=True)
    with running_stack(workers=args.workers, keep_logs=args.keep_logs) as stack:
        if args.keep_logs:
            print(f"process logs in {stack.log_dir}")
        result = uvloop.run(run(stack, args))
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
