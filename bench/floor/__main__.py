"""python -m bench.floor [--blocks 10] [--requests 200] [--warmup 300] [--json PATH]: see bench/floor/__init__.py."""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

from cli.embedded_redis import free_port, start_server

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("direct", "V1", "V2", "V3")
VARIANTS = {  # name: (API module, worker module, worker arguments after the ports)
    "V1": ("api_asgi", "worker_redispy", ["httpx"]),
    "V2": ("api_asgi", "worker_redispy", ["aiohttp"]),
    "V3": ("api_raw", "worker_raw", []),
}
METRICS = (("nonstream", "ns", 0), ("stream_ttft", "st", 0), ("stream_total", "st", 1))  # name, mode, sample index
LABELS = {"nonstream": "non-stream", "stream_ttft": "TTFT", "stream_total": "stream total"}
ROLES = ("api", "worker", "redis", "fake", "client")

REQUEST = {"model": "general-best", "messages": [{"role": "user", "content": "Say hello to the gateway."}],
           "max_tokens": 16}
NONSTREAM_BODY = orjson.dumps({**REQUEST, "stream": False})
STREAM_BODY = orjson.dumps({**REQUEST, "stream": True})
HEADERS = {"content-type": "application/json"}
STREAM_EVENTS = 19  # what the fake sends for max_tokens=16: role + 16 tokens + finish/usage chunks + [DONE]


class BadAnswer(Exception):
    pass


async def nonstream(client: httpx.AsyncClient, url: str) -> tuple[float, ...]:
    start = time.perf_counter()
    response = await client.post(url, content=NONSTREAM_BODY, headers=HEADERS)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    data = response.content
    if response.status_code != 200 or b'"chat.completion"' not in data or b" 13" not in data:
        raise BadAnswer(f"{url}: {response.status_code} {data[:300]!r}")
    return (elapsed_ms,)


async def stream(client: httpx.AsyncClient, url: str) -> tuple[float, ...]:
    start = time.perf_counter()
    first = None
    data = b""
    async with client.stream("POST", url, content=STREAM_BODY, headers=HEADERS) as response:
        async for chunk in response.aiter_raw():
            if first is None and b"data:" in chunk:
                first = time.perf_counter()
            data += chunk
    end = time.perf_counter()
    if first is None or data.count(b"data: ") != STREAM_EVENTS or not data.endswith(b"data: [DONE]\n\n"):
        raise BadAnswer(f"{url}: {response.status_code} {data[-300:]!r}")
    return (first - start) * 1e3, (end - start) * 1e3


MODES: dict[str, Callable[[httpx.AsyncClient, str], Awaitable[tuple[float, ...]]]] = {"ns": nonstream, "st": stream}


def process_cpu_ms(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def system_busy_ms() -> float:
    """Busy CPU time of the whole machine (all cores) so far, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) * 1000 / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(samples: list[float], q: float) -> float:
    """Linearly interpolated percentile, q in 0..1."""
    ordered = sorted(samples)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def wait_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with code {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{process.args!r} did not listen on port {port} within {timeout_s}s")


def spawn(module: str, *args: Any) -> subprocess.Popen[bytes]:
    # A session of its own: Ctrl-C reaches only this process, which then stops the children in order.
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=REPO, start_new_session=True)


def start_all(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, str]:
    """Start the fake upstream and each variant's Valkey, API and worker; -> URL per target."""
    upstream_port = free_port()
    procs["fake"] = spawn("bench.fake_upstream", "--port", upstream_port)
    wait_port(upstream_port, procs["fake"])
    urls = {"direct": f"http://127.0.0.1:{upstream_port}/v1/chat/completions"}
    for name, (api, worker, worker_args) in VARIANTS.items():
        redis_port, api_port = free_port(), free_port()
        procs[f"{name}.redis"] = start_server(redis_port)
        procs[f"{name}.api"] = spawn(f"bench.floor.{api}", redis_port, api_port)
        procs[f"{name}.worker"] = spawn(f"bench.floor.{worker}", redis_port, upstream_port, *worker_args)
        wait_port(api_port, procs[f"{name}.api"])
        urls[name] = f"http://127.0.0.1:{api_port}/v1/chat/completions"
    return urls


def stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in procs.values():
        if process.poll() is None:
            process.terminate()
    for process in procs.values():
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def measure(urls: dict[str, str], pids: dict[str, int], blocks: int, n: int, warmup: int) -> dict[str, Any]:
    samples: dict[tuple[str, str], list[list[tuple[float, ...]]]] = defaultdict(list)
    cpu_ms: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    # The processes a target's requests run through: the fake and this client always, plus its own three.
    involved = {t: [k for k in pids if k in ("fake", "client") or k.startswith(t + ".")] for t in TARGETS}
    async with httpx.AsyncClient(timeout=30) as client:
        print(f"warm-up: {warmup} requests per target and mode", file=sys.stderr)
        for call in MODES.values():
            for _ in range(warmup):
                for target in TARGETS:
                    await call(client, urls[target])
        loads = [os.getloadavg()[0]]
        busy_before, ours_before, wall_before = system_busy_ms(), sum(map(process_cpu_ms, pids.values())), time.time()
        for block in range(blocks):
            # Rotate the order every block and reverse it every 4 blocks: no target always runs right
            # after the same other one, or always first, when the machine is warm or cold.
            order = TARGETS[block % 4 :] + TARGETS[: block % 4]
            if block // 4 % 2:
                order = order[::-1]
            for mode, call in MODES.items():
                for target in order:
                    before = {k: process_cpu_ms(pids[k]) for k in involved[target]}
                    samples[target, mode].append([await call(client, urls[target]) for _ in range(n)])
                    for k in involved[target]:
                        cpu_ms[target, mode][k.split(".")[-1]] += process_cpu_ms(pids[k]) - before[k]
            loads.append(os.getloadavg()[0])
            print(f"block {block + 1}/{blocks} done, load 1m {loads[-1]:.2f}", file=sys.stderr)
        ours = sum(map(process_cpu_ms, pids.values())) - ours_before
        other_ms = system_busy_ms() - busy_before - ours
        other_pct = 100 * other_ms / 1000 / (time.time() - wall_before)
    return {"samples": samples, "cpu_ms": cpu_ms, "loads": loads, "other_cpu_pct": other_pct}


def summarize(measured: dict[str, Any], blocks: int, n: int) -> dict[str, Any]:
    samples, cpu_ms = measured["samples"], measured["cpu_ms"]
    out: dict[str, Any] = {}
    for target in TARGETS:
        out[target] = {}
        for name, mode, index in METRICS:
            row: dict[str, Any] = {}
            for q, label in ((0.5, "p50"), (0.99, "p99")):
                per_block = [percentile([s[index] for s in block], q) for block in samples[target, mode]]
                direct = [percentile([s[index] for s in block], q) for block in samples["direct", mode]]
                row[label] = round(statistics.median(per_block), 3)
                if target != "direct":
                    added = [g - d for g, d in zip(per_block, direct, strict=True)]
                    row["added_" + label] = round(statistics.median(added), 3)
                    row[f"added_{label}_block_minmax"] = [round(min(added), 3), round(max(added), 3)]
            out[target][name] = row
        out[target]["cpu_ms_per_request"] = {
            mode: {role: round(ms / (blocks * n), 3) for role, ms in cpu_ms[target, mode].items()} for mode in MODES}
    return out


def print_table(result: dict[str, Any]) -> None:
    def cell(value: float | None) -> str:
        return f"{value:7.3f}" if value is not None else f"{'-':>7}"

    print(f"\nAdded-latency floor (no product logic): {result['blocks']} blocks x {result['requests']} sequential "
          f"requests per target and mode, {result['warmup']} warm-up, wall {result['wall_s']} s")
    print(f"{'':22}{'gateway ms':>15}{'direct ms':>16}{'added ms':>16}  {'added p50':>14}    CPU ms per request")
    print(f"{'target':7}{'metric':15}{'p50':>7} {'p99':>7} {'p50':>7} {'p99':>7} {'p50':>7} {'p99':>7}  "
          f"{'block min..max':>14}  " + " ".join(f"{r:>6}" for r in ROLES))
    direct = result["direct"]
    for target in TARGETS:
        for name, mode, _ in METRICS:
            row, own = direct[name], result[target][name]
            gateway = (None, None) if target == "direct" else (own["p50"], own["p99"])
            low_high = own.get("added_p50_block_minmax")
            spread = f"{low_high[0]:.2f}..{low_high[1]:.2f}" if low_high else "-"
            cpu = ""
            if name != "stream_ttft":  # TTFT and stream total are the same requests: CPU once, on the total
                per_role = result[target]["cpu_ms_per_request"][mode]
                cpu = " ".join(f"{per_role[r]:6.3f}" if r in per_role else f"{'-':>6}" for r in ROLES)
            print(f"{target:7}{LABELS[name]:15}{cell(gateway[0])} {cell(gateway[1])} {cell(row['p50'])} "
                  f"{cell(row['p99'])} {cell(own.get('added_p50'))} {cell(own.get('added_p99'))}  {spread:>14}  {cpu}")
    print("p50/p99 per block, median over blocks; added = median over blocks of (gateway - direct) in the same block.")
    print(f"load average before: {result['load_before']}   after: {result['load_after']}   "
          f"1m max during blocks: {result['load_1m_max']:.2f}   "
          f"CPU of other processes: {result['other_cpu_pct_of_one_core']:.1f}% of one core")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Added-latency floor of client→API→Redis→worker→upstream and back")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per target, mode and block")
    parser.add_argument("--warmup", type=int, default=300, help="requests per target and mode before measuring")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)

    # `kill` and `timeout` send SIGTERM: make it unwind like Ctrl-C so the finally below stops the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        load_before = load_average()
        urls = start_all(procs)
        pids = {k: p.pid for k, p in procs.items()} | {"client": os.getpid()}
        started = time.time()
        measured = uvloop.run(measure(urls, pids, args.blocks, args.requests, args.warmup))
        result = {"blocks": args.blocks, "requests": args.requests, "warmup": args.warmup,
                  "wall_s": round(time.time() - started, 1), "load_before": load_before,
                  "load_after": load_average(), "load_1m_max": max(measured["loads"]),
                  "load_1m_per_block": [round(x, 2) for x in measured["loads"]],
                  "other_cpu_pct_of_one_core": round(measured["other_cpu_pct"], 1),
                  **summarize(measured, args.blocks, args.requests)}
    finally:
        stop_all(procs)
    print_table(result)
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        print(f"written: {args.json}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the children are already stopped; no traceback for that
        print("interrupted", file=sys.stderr)
        sys.exit(130)
