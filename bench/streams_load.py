"""New-request latency while 100 long streams are in flight, token order, and Redis CPU.

    python -m bench.streams_load [--rounds 3] [--streams 100] [--workers 2] [--json PATH]

Per round: the fake upstream is told to pace `general-best` at 20 tokens/s
(`token_interval_s: 0.05`); 100 streaming requests with `max_tokens: 200` go through the
gateway at once (about 10 s each). While they are all in flight, probe requests to another
model (`coder`, unpaced) alternate between the fake directly and the gateway, one at a time
and at most 40 a second, and their time-to-first-token is recorded. Every long stream must
bring back all 200 numbered tokens in order and then [DONE]; the fake's request log must
show exactly one upstream call per request (none lost, none run twice). Redis CPU is read from
/proc/<pid>/stat over the window in which all streams are in flight.
"""

import argparse
import asyncio
import statistics
import time
from typing import Any

import httpx
import orjson
import uvloop

from bench.harness import (
    AUTO_MODEL,
    CODE_MODEL,
    BadAnswer,
    Stack,
    cpu_seconds,
    load_average,
    percentile,
    running_stack,
    targets,
    timed_call,
    upstream_calls,
)

PROBE_TOKENS = 16
# Probing starts once every long stream has had time to start, and stops before the first ends.
SETTLE_S = 1.0
STOP_BEFORE_END_S = 0.7
# Probes start at most this often (20/s per path), so the Redis CPU measured in the window is
# the streams' and not whatever rate a closed loop of probes happens to reach.
PROBE_EVERY_S = 0.025


class NoProbes(Exception):
    """Not one probe per path succeeded while the streams ran: the round measured nothing."""


async def _long_stream(client: httpx.AsyncClient, stack: Stack, tokens: int) -> float:
    _, via = targets(stack)
    return await timed_call(client, via, True, tokens)


async def one_round(stack: Stack, streams: int, tokens: int, interval_s: float) -> dict[str, Any]:
    """One burst of long streams with probes alongside; returns the round's measurements."""
    await asyncio.to_thread(stack.fake.reset)
    await asyncio.to_thread(stack.fake.set_default, AUTO_MODEL, {"token_interval_s": interval_s})
    direct, via = targets(stack, gateway_model="code", upstream_model=CODE_MODEL)
    load_before = load_average()
    limits = httpx.Limits(max_connections=streams + 16, max_keepalive_connections=streams + 16)
    async with httpx.AsyncClient(limits=limits, timeout=60) as long_client, \
            httpx.AsyncClient(timeout=30) as probe_client:
        for target in (direct, via):  # warm the probe connections before the burst
            await timed_call(probe_client, target, True, PROBE_TOKENS)
        started = time.monotonic()
        tasks = [asyncio.create_task(_long_stream(long_client, stack, tokens)) for _ in range(streams)]
        await asyncio.sleep(SETTLE_S)
        window_end = started + (tokens + 1) * interval_s - STOP_BEFORE_END_S
        pids = stack.pids()
        cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        window_start = time.monotonic()
        ttft: dict[str, list[float]] = {"direct": [], "gateway": []}
        probe_failures: list[str] = []
        i = 0
        while time.monotonic() < window_end and not any(t.done() for t in tasks):
            await asyncio.sleep(max(window_start + i * PROBE_EVERY_S - time.monotonic(), 0))
            target = (direct, via)[i % 2]
            i += 1
            try:
                ttft[target.name].append(await timed_call(probe_client, target, True, PROBE_TOKENS))
            except (BadAnswer, httpx.HTTPError) as exc:
                probe_failures.append(f"{target.name}: {exc!r}")
        window_s = time.monotonic() - window_start
        cpu_after = {role: cpu_seconds(pid) for role, pid in pids.items()}
        all_in_flight = not any(t.done() for t in tasks)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    stream_ttft = [o for o in outcomes if isinstance(o, float)]
    broken = [o for o in outcomes if not isinstance(o, float)]
    seen = await asyncio.to_thread(upstream_calls, stack.fake)
    sent = {"direct": len(ttft["direct"]) + 1, "gateway": len(ttft["gateway"]) + 1 + streams}
    cpu_pct = {role: round(100 * (cpu_after[role] - cpu_before[role]) / window_s, 1) for role in pids}
    if not ttft["direct"] or not ttft["gateway"]:
        raise NoProbes(f"no probe got through while the streams ran: {probe_failures[:3]} "
                           f"(long streams: {[repr(b) for b in broken[:3]]})")
    d99, g99 = percentile(ttft["direct"], 99), percentile(ttft["gateway"], 99)
    d50, g50 = percentile(ttft["direct"], 50), percentile(ttft["gateway"], 50)
    return {
        "streams": streams, "streams_complete_in_order": len(stream_ttft),
        "stream_failures": [repr(b) for b in broken[:5]], "all_in_flight_during_window": all_in_flight,
        "window_s": round(window_s, 2), "probes_direct": len(ttft["direct"]), "probes_gateway": len(ttft["gateway"]),
        "probe_failures": len(probe_failures), "probe_failure_examples": probe_failures[:3],
        "probe_ttft_direct_p50_ms": round(d50 * 1000, 2), "probe_ttft_direct_p99_ms": round(d99 * 1000, 2),
        "probe_ttft_gateway_p50_ms": round(g50 * 1000, 2), "probe_ttft_gateway_p99_ms": round(g99 * 1000, 2),
        "added_ttft_p50_ms": round((g50 - d50) * 1000, 2), "added_ttft_p99_ms": round((g99 - d99) * 1000, 2),
        "burst_ttft_p50_ms": round(percentile(stream_ttft, 50) * 1000, 1) if stream_ttft else None,
        "burst_ttft_max_ms": round(max(stream_ttft) * 1000, 1) if stream_ttft else None,
        "cpu_pct_of_one_core": cpu_pct, "upstream_calls_seen": seen, "requests_sent": sent,
        "lost_or_duplicated": sum(abs(seen[k] - sent[k]) for k in sent),
        "load_before": load_before, "load_after": load_average(),
        # Every probe, so the summary can also take percentiles over all rounds together.
        "probe_ttft_ms": {name: [round(t * 1000, 3) for t in times] for name, times in ttft.items()},
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of the numbers the targets are about; totals of the failures."""

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 2)

    def pooled(name: str, q: float) -> float:
        return percentile([t for r in rounds for t in r["probe_ttft_ms"][name]], q)

    return {
        "rounds": len(rounds),  # rounds that measured something (failed rounds are printed)
        "added_ttft_p50_ms": med("added_ttft_p50_ms"), "added_ttft_p99_ms": med("added_ttft_p99_ms"),
        "added_ttft_p99_range_ms": [min(r["added_ttft_p99_ms"] for r in rounds),
                                    max(r["added_ttft_p99_ms"] for r in rounds)],
        # A round's p99 is its second-worst probe of ~170; over all rounds' probes together it
        # rests on several, so it moves less from run to run.
        "added_ttft_p99_all_probes_ms": round(pooled("gateway", 99) - pooled("direct", 99), 2),
        "redis_cpu_pct": round(statistics.median(r["cpu_pct_of_one_core"]["redis"] for r in rounds), 1),
        "streams_complete_in_order": sum(r["streams_complete_in_order"] for r in rounds),
        "streams_total": sum(r["streams"] for r in rounds),
        "probe_failures": sum(r["probe_failures"] for r in rounds),
        "lost_or_duplicated": sum(r["lost_or_duplicated"] for r in rounds),
    }


async def run(stack: Stack, rounds: int = 3, streams: int = 100, tokens: int = 200,
              interval_s: float = 0.05) -> dict[str, Any]:
    """All rounds; prints each round and the summary, returns both."""
    print(f"\n{streams} streams × {tokens} tokens at {1 / interval_s:.0f} tokens/s, probes alongside:", flush=True)
    results = []
    for i in range(rounds):
        try:
            result = await one_round(stack, streams, tokens, interval_s)
        except NoProbes as exc:
            print(f"  round {i + 1}: FAILED: {exc} (load {load_average()})", flush=True)
            continue
        results.append(result)
        print(f"  round {i + 1}: added TTFT p50/p99 {result['added_ttft_p50_ms']:.2f}/"
              f"{result['added_ttft_p99_ms']:.2f} ms (gateway {result['probe_ttft_gateway_p50_ms']:.2f}/"
              f"{result['probe_ttft_gateway_p99_ms']:.2f}, direct {result['probe_ttft_direct_p50_ms']:.2f}/"
              f"{result['probe_ttft_direct_p99_ms']:.2f}; {result['probes_gateway']} probes), "
              f"streams in order {result['streams_complete_in_order']}/{streams}, "
              f"lost/dup {result['lost_or_duplicated']}, CPU % of a core {result['cpu_pct_of_one_core']}, "
              f"burst TTFT p50/max {result['burst_ttft_p50_ms']}/{result['burst_ttft_max_ms']} ms, "
              f"load {result['load_before']} → {result['load_after']}", flush=True)
    if not results:
        return {"rounds": [], "summary": None}
    summary = summarize(results)
    print(f"  summary (median of {rounds} rounds): {summary}", flush=True)
    return {"rounds": results, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    """Start the stack and run only this scenario."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=str, help="also write the results here")
    args = parser.parse_args(argv)
    print(f"load average at start: {load_average()}", flush=True)
    with running_stack(workers=args.workers) as stack:
        result = uvloop.run(run(stack, rounds=args.rounds, streams=args.streams))
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
