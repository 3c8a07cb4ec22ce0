"""Time to first token when a primary's first token is suddenly far slower than its history.

    python -m bench.hedge_ttft [--base REV | --repo PATH] [--trials 6] [--fast 24]
                               [--first-token-s 15] [--slow-s 60]

A primary and a fallback model on the fake upstream, the provider's first-token timeout
`--first-token-s` (15 s is the catalog's default). Each trial streams `--fast` requests that the
primary answers at once (its history), then one whose first token the primary holds back for
`--slow-s`: without a hedge the caller waits for the timeout before the fallback starts; with one
the fallback starts after the threshold learned from the primary's history (at least
FREEFERENCE_HEDGE_MIN_S). Reported per build: the slow requests' time to first token (median and
range), the fast ones' (p50), and who answered.

With `--base REV` a build of REV runs at the same time (a temporary `git worktree`, its own
Valkey and fake upstream), so the ratio compares like with like on this machine.
"""

import argparse
import asyncio
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop
import yaml

from bench.ab_compare import this_and_base
from bench.harness import BadAnswer, Stack, Target, load_average, percentile, timed_call

MAX_TOKENS = 8


def catalog(first_token_s: float) -> Callable[[str], str]:
    """primary (fake-a) before backup (fake-b) for every intent, with this first-token timeout."""

    def build(upstream_url: str) -> str:
        timeout = {"connect_s": 2, "first_token_s": first_token_s, "idle_s": 20, "total_s": 120}
        providers = [{"id": "fake-a", "base_url": upstream_url, "api_keys_env": ["FAKE_A_KEY"], "timeout": timeout,
                      "refresh_models_s": 0},
                     {"id": "fake-b", "base_url": upstream_url, "requires_key": False, "timeout": timeout,
                      "refresh_models_s": 0}]
        models = [{"id": "primary", "provider": "fake-a", "upstream_name": "primary", "context_window": 32768,
                   "scores": {"general": 0.9, "code": 0.9, "reasoning": 0.9}},
                  {"id": "backup", "provider": "fake-b", "upstream_name": "backup", "context_window": 32768,
                   "scores": {"general": 0.7, "code": 0.7, "reasoning": 0.7}}]
        return yaml.safe_dump({"providers": providers, "models": models, "capabilities": {
            "text-basic": {"name": "General Chat Model", "intent": "general"}}}, sort_keys=False)

    return build


@dataclass
class Timings:
    slow_s: list[float] = field(default_factory=list)
    fast_s: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    def line(self, name: str) -> str:
        slow = (f"median {statistics.median(self.slow_s):.2f} s [{min(self.slow_s):.2f}..{max(self.slow_s):.2f}]"
                if self.slow_s else "none")
        fast = f"{percentile(self.fast_s, 50) * 1000:.1f} ms" if self.fast_s else "none"
        failed = ", ".join(f"{n}× {k}" for k, n in self.failures.items()) or "none"
        return f"  {name}: slow first token → {slow}; usual first token p50 {fast}; failures: {failed}"


def _target(stack: Stack, model: str) -> Target:
    return Target("gateway", stack.gateway_url, {"Authorization": f"Bearer {stack.key}",
                                                 "Content-Type": "application/json"}, None, model)


async def trials(stack: Stack, args: argparse.Namespace) -> Timings:
    out = Timings()
    async with httpx.AsyncClient(timeout=args.first_token_s + 60) as client:
        for _ in range(args.trials):
            for _ in range(args.fast):
                try:
                    out.fast_s.append(await timed_call(client, _target(stack, "primary"), True, MAX_TOKENS))
                except (BadAnswer, httpx.HTTPError) as exc:
                    out.failures[type(exc).__name__] += 1
            stack.fake.script("primary", {"first_token_delay_s": args.slow_s})
            try:
                out.slow_s.append(await timed_call(client, _target(stack, "backup"), True, MAX_TOKENS))
            except (BadAnswer, httpx.HTTPError) as exc:
                out.failures[str(exc).split(" (")[0]] += 1
    return out


async def run(stacks: dict[str, Stack], args: argparse.Namespace) -> dict[str, Timings]:
    names = list(stacks)
    results = await asyncio.gather(*(trials(stacks[n], args) for n in names))
    return dict(zip(names, results, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="also run a build of this git revision, at the same time")
    parser.add_argument("--repo", type=Path, help="run only the checkout at this path")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--fast", type=int, default=24)
    parser.add_argument("--first-token-s", type=float, default=15.0)
    parser.add_argument("--slow-s", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"load average at start: {load_average()}")
    build = catalog(args.first_token_s)
    with this_and_base(args.base, args.repo, args.workers, build) as stacks:
        results = uvloop.run(run(stacks, args))
    print(f"bench.hedge_ttft: {args.trials} trials of {args.fast} usual requests then one whose first token the "
          f"primary holds back {args.slow_s:g} s; first-token timeout {args.first_token_s:g} s; streaming")
    for name, timings in results.items():
        print(timings.line(name))
    if "base" in results and results["base"].slow_s and results["this"].slow_s:
        ratio = statistics.median(results["this"].slow_s) / statistics.median(results["base"].slow_s)
        print(f"  slow first token this/base (medians): {ratio:.3f}")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
