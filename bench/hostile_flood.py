"""Hostile input against a running gateway, with normal traffic measured alongside.

    python -m bench.hostile_flood [--connections 1000] [--seconds 15] [--concurrency 4]

Starts a private Valkey, the fake upstream, one API and two workers (bench/harness.py), then
measures normal requests (gateway and, in the same loop, the fake directly) in four phases:

1. quiet: nothing else going on;
2. bogus-key flood: `--connections` connections with a made-up key that send their headers and
   then trickle a body, one byte a second;
3. hostile tenant: the same with a valid key (its own slow uploads);
4. memory: RSS growth of the API after twenty requests with 10 MB headers.

For each traffic phase it prints the success rate and p50 / p95 of normal requests through the
gateway and direct, and what became of the flood's connections (answered and closed, or still
open at the end). This machine's speed drifts: read the ratios within one run.
"""

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop

from bench.harness import BadAnswer, Stack, percentile, running_stack, targets, timed_call

MAX_TOKENS = 16


@dataclass
class Traffic:
    """Normal requests of one phase."""

    gateway_s: list[float] = field(default_factory=list)
    direct_s: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    def line(self, phase: str) -> str:
        total = len(self.gateway_s) + sum(self.failures.values())
        rate = len(self.gateway_s) / total if total else 0.0
        g50, g95 = (percentile(self.gateway_s, q) * 1000 for q in (50, 95)) if self.gateway_s else (0.0, 0.0)
        d50, d95 = (percentile(self.direct_s, q) * 1000 for q in (50, 95)) if self.direct_s else (0.0, 0.0)
        failed = ", ".join(f"{n}× {kind}" for kind, n in sorted(self.failures.items())) or "none"
        return (f"{phase:<16} gateway {len(self.gateway_s):>5} ok of {total:>5} ({rate:6.1%})  "
                f"p50 {g50:6.1f} ms  p95 {g95:6.1f} ms | direct p50 {d50:6.1f} ms  p95 {d95:6.1f} ms | "
                f"failures: {failed}")


async def normal_traffic(stack: Stack, seconds: float, concurrency: int) -> Traffic:
    """Alternating direct and gateway requests from `concurrency` loops for `seconds`."""
    direct, via = targets(stack)
    out = Traffic()
    stop_at = time.monotonic() + seconds

    async def loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            for target, samples in ((direct, out.direct_s), (via, out.gateway_s)):
                try:
                    samples.append(await timed_call(client, target, False, MAX_TOKENS))
                except (BadAnswer, httpx.HTTPError) as exc:
                    kind = str(exc).split(":")[0] if isinstance(exc, BadAnswer) else type(exc).__name__
                    out.failures[kind] = out.failures.get(kind, 0) + 1

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
    return out


@dataclass
class Flood:
    """The hostile connections of one phase and what became of them."""

    opened: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    closed_by_server: int = 0
    close_s: list[float] = field(default_factory=list)
    tasks: list["asyncio.Task[None]"] = field(default_factory=list)

    def line(self) -> str:
        statuses = ", ".join(f"{n}× {s or 'no answer'}" for s, n in sorted(self.statuses.items())) or "none yet"
        p50 = percentile(self.close_s, 50) if self.close_s else 0.0
        p95 = percentile(self.close_s, 95) if self.close_s else 0.0
        return (f"{'':<16} flood: {self.opened} connections; answers {statuses}; closed by the gateway "
                f"{self.closed_by_server} (after p50 {p50:.2f} s, p95 {p95:.2f} s); still open "
                f"{self.opened - self.closed_by_server}")


async def _hostile(url: str, key: str, flood: Flood) -> None:
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, int(port))
    flood.opened += 1
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{").encode()
    try:
        writer.write(head)
        answer = b""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    piece = await reader.read(65536)
                    if not piece:
                        break  # closed by the gateway
                    answer += piece
                    continue
            writer.write(b" ")  # one byte a second, for as long as the connection stays open
            await writer.drain()
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        flood.statuses[status] = flood.statuses.get(status, 0) + 1
        flood.closed_by_server += 1
        flood.close_s.append(time.monotonic() - started)
    except (ConnectionError, OSError):
        flood.closed_by_server += 1
        flood.close_s.append(time.monotonic() - started)
        flood.statuses[0] = flood.statuses.get(0, 0) + 1
    finally:
        writer.close()


async def flood_phase(stack: Stack, key: str, connections: int, seconds: float, concurrency: int) -> tuple[Traffic,
                                                                                                           Flood]:
    flood = Flood()
    for _ in range(connections):
        flood.tasks.append(asyncio.create_task(_hostile(stack.gateway.base_url, key, flood)))
    await asyncio.sleep(0.5)  # the flood is open before normal traffic starts
    traffic = await normal_traffic(stack, seconds, concurrency)
    for task in flood.tasks:
        task.cancel()
    await asyncio.gather(*flood.tasks, return_exceptions=True)
    return traffic, flood


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def header_flood(stack: Stack) -> str:
    """RSS of the API before and after twenty requests with 10 MB headers."""
    pid = stack.gateway.apis[0].pid
    before = rss_mb(pid)
    host, port = stack.gateway.base_url.removeprefix("http://").split(":")
    statuses: list[int] = []
    for _ in range(20):
        reader, writer = await asyncio.open_connection(host, int(port))
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000_000 + b"\r\n\r\n")
            await writer.drain()
        try:
            answer = await reader.read(65536)
        except (ConnectionError, OSError):
            answer = b""  # reset: the gateway closed with our unread megabytes in its socket buffer
        statuses.append(int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0)
        writer.close()
    after = rss_mb(pid)
    answers = ", ".join(f"{statuses.count(s)}× {s or 'reset'}" for s in sorted(set(statuses)))
    return (f"header flood: 20 requests with 10 MB headers → {answers}; API RSS "
            f"{before:.0f} → {after:.0f} MB (+{after - before:.1f} MB)")


async def run_phases(stack: Stack, tenant: str, args: argparse.Namespace) -> None:
    print(f"bench.hostile_flood: {args.connections} connections, {args.seconds:g} s per phase, "
          f"concurrency {args.concurrency}")
    quiet = await normal_traffic(stack, args.seconds, args.concurrency)
    print(quiet.line("quiet"))
    traffic, flood = await flood_phase(stack, "ff-bogus-" + "x" * 43, args.connections, args.seconds,
                                       args.concurrency)
    print(traffic.line("bogus-key flood"))
    print(flood.line())
    traffic, flood = await flood_phase(stack, tenant, args.connections, args.seconds, args.concurrency)
    print(traffic.line("tenant flood"))
    print(flood.line())
    print(await header_flood(stack))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repo", type=Path, default=None,
                        help="run the gateway from another checkout (e.g. an earlier release, for comparison)")
    args = parser.parse_args()
    with running_stack(workers=2, repo=args.repo) as stack:
        tenant = stack.gateway.create_key("pro", name="hostile-tenant")
        uvloop.run(run_phases(stack, tenant, args))


if __name__ == "__main__":
    main()

