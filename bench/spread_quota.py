"""Free-tier quota spread: equivalent deployments with small per-minute limits, steady traffic.

    python -m bench.spread_quota [--base REV | --repo PATH] [--minutes 3] [--rpm 60] [--limit 20]
                                 [--deployments 4] [--signals headers|retry-after|none]

Starts a gateway whose catalog has `--deployments` equally scored models on one provider (one
key, limits per model, as Groq's or Gemini's free tiers), each limited by the fake upstream to
`--limit` requests a minute. `--signals` says what the provider tells about its limits:
`headers` (the default: rate-limit headers on every answer, Retry-After on a 429), `retry-after`
(only the 429's Retry-After: the gateway ignores the headers, as for Gemini, which sends none) or
`none` (a bare 429, as some free tiers answer). It
offers `--rpm` non-streaming requests a minute, evenly spaced, for `--minutes`, and reports
what callers saw (answers, errors by status) and what the upstream saw (requests and 429s per
deployment, the longest run of consecutive 429s).

With `--base REV` the same scenario runs at the same time against a build of REV (a temporary
`git worktree`, each build with its own Valkey and fake upstream), so both see the same machine;
`--repo PATH` runs only the checkout at PATH.
"""

import argparse
import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop
import yaml

from bench.ab_compare import this_and_base
from bench.harness import Stack, load_average, percentile

MODELS = "eq-{}"


def catalog(deployments: int, signals: str) -> Callable[[str], str]:
    """A catalog of `deployments` equivalent models on one keyed provider of the fake."""

    def build(upstream_url: str) -> str:
        provider = {"id": "free", "base_url": upstream_url, "api_keys_env": ["FAKE_A_KEY"],
                    "timeout": {"connect_s": 2, "first_token_s": 10, "idle_s": 10, "total_s": 30},
                    "refresh_models_s": 0,
                    "profile": {"limits": {"scope": "model", "headers": "openai" if signals == "headers" else "none"}}}
        models = [{"id": MODELS.format(i), "provider": "free", "upstream_name": MODELS.format(i),
                   "context_window": 32768, "capabilities": ["chat"],
                   "scores": {"general": 0.8, "code": 0.8, "reasoning": 0.8}} for i in range(1, deployments + 1)]
        return yaml.safe_dump({"providers": [provider], "models": models, "capabilities": {
            "text-basic": {"name": "General Chat Model", "intent": "general"}}}, sort_keys=False)

    return build


@dataclass
class Outcome:
    """What one build's run looked like from both ends."""

    statuses: Counter[int] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    upstream: Counter[str] = field(default_factory=Counter)
    limited: Counter[str] = field(default_factory=Counter)
    longest_429_run: int = 0

    def lines(self, name: str) -> list[str]:
        errors = sum(n for s, n in self.statuses.items() if s != 200)
        p50 = percentile(self.latencies_s, 50) * 1000 if self.latencies_s else 0.0
        p95 = percentile(self.latencies_s, 95) * 1000 if self.latencies_s else 0.0
        answered = sum(self.statuses.values())
        per_deployment = ", ".join(f"{m} {self.upstream[m]} calls / {self.limited[m]}×429 / served {self.served[m]}"
                                   for m in sorted(self.upstream))
        other = ", ".join(f"{n}× {s}" for s, n in sorted(self.statuses.items()) if s != 200) or "none"
        return [f"  {name}: {answered - errors}/{answered} answered, caller-visible errors {errors} ({other}); "
                f"upstream 429s {sum(self.limited.values())} (longest run {self.longest_429_run}); "
                f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms",
                f"     per deployment: {per_deployment}"]


async def offer(stack: Stack, rpm: int, minutes: float) -> Outcome:
    """`rpm` requests a minute, evenly spaced whatever the answers take, for `minutes`."""
    out = Outcome()
    interval_s = 60.0 / rpm
    count = int(minutes * rpm)
    body = {"model": "auto", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    headers = {"Authorization": f"Bearer {stack.key}"}

    async def one(client: httpx.AsyncClient) -> None:
        started = time.perf_counter()
        try:
            response = await client.post(stack.gateway_url, json=body, headers=headers)
        except httpx.HTTPError:
            out.statuses[0] += 1
            return
        out.statuses[response.status_code] += 1
        if response.status_code == 200:
            out.latencies_s.append(time.perf_counter() - started)
            out.served[response.headers.get("x-freeference-model", "?")] += 1

    async with httpx.AsyncClient(timeout=60) as client:
        began = time.monotonic()
        tasks = []
        for n in range(count):
            await asyncio.sleep(max(began + n * interval_s - time.monotonic(), 0))
            tasks.append(asyncio.create_task(one(client)))
        await asyncio.gather(*tasks)
    run = 0
    for entry in stack.fake.requests():
        out.upstream[entry["model"]] += 1
        if entry.get("limited"):
            out.limited[entry["model"]] += 1
            run += 1
            out.longest_429_run = max(out.longest_429_run, run)
        else:
            run = 0
    return out


async def scenario(stacks: dict[str, Stack], args: argparse.Namespace) -> dict[str, Outcome]:
    for stack in stacks.values():
        stack.fake.reset()
        for i in range(1, args.deployments + 1):
            stack.fake.set_rpm(MODELS.format(i), args.limit, retry_after=args.signals != "none")
    names = list(stacks)
    results = await asyncio.gather(*(offer(stacks[n], args.rpm, args.minutes) for n in names))
    return dict(zip(names, results, strict=True))


def report(results: dict[str, Outcome], args: argparse.Namespace) -> None:
    print(f"bench.spread_quota: {args.deployments} equivalent deployments at {args.limit} requests/minute each "
          f"(limit signals: {args.signals}), {args.rpm} requests/minute offered for {args.minutes:g} min")
    for name, outcome in results.items():
        for line in outcome.lines(name):
            print(line)
    if len(results) == 2:
        base, new = results["base"], results["this"]
        ratio = (sum(new.limited.values()) / sum(base.limited.values())) if sum(base.limited.values()) else float("nan")
        print(f"  upstream 429s this/base: {ratio:.2f}; p50 latency this/base: "
              f"{statistics.median(new.latencies_s) / statistics.median(base.latencies_s):.2f}"
              if base.latencies_s and new.latencies_s else "  (no latencies to compare)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="also run a build of this git revision, at the same time")
    parser.add_argument("--repo", type=Path, help="run only the checkout at this path")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rpm", type=int, default=60)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--deployments", type=int, default=4)
    parser.add_argument("--signals", choices=["headers", "retry-after", "none"], default="headers")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"load average at start: {load_average()}")
    build = catalog(args.deployments, args.signals)
    with this_and_base(args.base, args.repo, args.workers, build) as stacks:
        results = uvloop.run(scenario(stacks, args))
    report(results, args)
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
