"""A/B: this checkout's gateway against another revision's, side by side in one run.

    python -m bench.ab_compare --base REV [--blocks 10] [--requests 200] [--stream]
                               [--workers 2] [--base-workers N]

On this machine two runs of the same build differ by up to ~1 ms at p50 (the load moves
under us), more than most single changes save, so comparing two benchmark runs taken
minutes apart says little. This starts both builds at once, each with its own Valkey, fake
upstream, API and workers (the base from a temporary `git worktree` of REV, run with this
environment's packages), and measures them in alternating blocks of sequential requests at
concurrency 1, with a direct call to the fake in every block and the order reversed every
other block, so drift hits both alike. It prints, per build, the median over blocks of the
added p50 (gateway − direct) with its range, the added p99, and CPU per request of all the
build's processes (API, workers, Redis, fake); then the per-block difference B − A, whose
median and range is the comparison to read.
"""

import argparse
import contextlib
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import uvloop

from bench.harness import Stack, Target, cpu_seconds, load_average, percentile, running_stack, targets, timed_call
from tests.support.processes import REPO

MAX_TOKENS = 16


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached checkout of `rev`, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ff-ab-")) / "base"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), rev], cwd=REPO, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)


@contextlib.contextmanager
def this_and_base(base: str | None, repo: Path | None, workers: int,
                  catalog: Callable[[str], str]) -> Iterator[dict[str, Stack]]:
    """Running stacks of this checkout ("this", or `repo`) and, when `base` names a revision,
    of that revision too ("base", started first), both on `catalog`; stopped afterwards."""
    with contextlib.ExitStack() as stack:
        stacks: dict[str, Stack] = {}
        if base:
            checkout = stack.enter_context(worktree(base))
            stacks["base"] = stack.enter_context(running_stack(workers=workers, repo=checkout, catalog=catalog))
        stacks["this"] = stack.enter_context(running_stack(workers=workers, repo=repo, catalog=catalog))
        yield stacks


async def _block(client: httpx.AsyncClient, target: Target, stream: bool, n: int) -> list[float]:
    return [await timed_call(client, target, stream, MAX_TOKENS) for _ in range(n)]


async def compare(stacks: dict[str, Stack], blocks: int, requests: int, stream: bool) -> None:
    paths = {name: targets(stack) for name, stack in stacks.items()}
    p50: dict[str, list[float]] = {"direct": [], "A": [], "B": []}
    p99: dict[str, list[float]] = {"direct": [], "A": [], "B": []}
    cpu_ms: dict[str, float] = {"A": 0.0, "B": 0.0}
    async with httpx.AsyncClient(timeout=30) as client:
        for direct, via in paths.values():  # warm-up: connections, pools, first-call costs
            await _block(client, direct, stream, 100)
            await _block(client, via, stream, 100)
        for b in range(blocks):
            order = [("direct", paths["A"][0]), ("A", paths["A"][1]), ("B", paths["B"][1])]
            for name, target in order if b % 2 == 0 else reversed(order):
                pids = list(stacks[name].pids().values()) if name != "direct" else []
                before = sum(cpu_seconds(pid) for pid in pids)
                latencies = await _block(client, target, stream, requests)
                if pids:
                    cpu_ms[name] += (sum(cpu_seconds(pid) for pid in pids) - before) * 1000 / requests / blocks
                p50[name].append(percentile(latencies, 50) * 1000)
                p99[name].append(percentile(latencies, 99) * 1000)
    mode = "time to first token" if stream else "non-streaming"
    print(f"{mode}, concurrency 1, {blocks} blocks x {requests} requests; direct p50 "
          f"{statistics.median(p50['direct']):.2f} ms (median of blocks)")
    for name in ("A", "B"):
        added = [g - d for g, d in zip(p50[name], p50["direct"], strict=True)]
        added99 = [g - d for g, d in zip(p99[name], p99["direct"], strict=True)]
        print(f"  {name}: added p50 {statistics.median(added):.2f} ms [{min(added):.2f}..{max(added):.2f}], "
              f"added p99 {statistics.median(added99):.2f} ms, CPU {cpu_ms[name]:.2f} ms/request (all processes)")
    diffs = [b - a for a, b in zip(p50["A"], p50["B"], strict=True)]
    print(f"  B - A per block, p50: median {statistics.median(diffs):+.2f} ms "
          f"[{min(diffs):+.2f}..{max(diffs):+.2f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against (A); B is this checkout")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--stream", action="store_true", help="time to first token instead of whole answers")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--base-workers", type=int, default=None, help="workers of A (default: --workers)")
    args = parser.parse_args()
    print(f"load average at start: {load_average()}")
    with worktree(args.base) as base, contextlib.ExitStack() as stacks:
        a = stacks.enter_context(running_stack(workers=args.base_workers or args.workers, repo=base))
        b = stacks.enter_context(running_stack(workers=args.workers))
        uvloop.run(compare({"A": a, "B": b}, args.blocks, args.requests, args.stream))
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
