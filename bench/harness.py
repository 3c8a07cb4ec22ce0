"""Shared benchmark helpers: start a private Valkey, the fake upstream and a gateway; time requests.

The gateway processes are started exactly as the integration tests start them
(tests/support/processes.py), so a benchmark measures the same commands a deployment runs
(`freeference api` on uvicorn + uvloop + httptools, `freeference worker` on uvloop).
"""

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis as AsyncRedis

from bench.fake_upstream import reply_tokens
from cli.embedded_redis import free_port, start_server
from tests.support.processes import FakeUpstream, Gateway, base_env, catalog_yaml, spawn, wait_http

# The model every auto-routed request lands on in the test catalog, and a second one on the
# same provider that benchmarks can load differently (via the fake's per-model defaults).
AUTO_MODEL = "general-best"
CODE_MODEL = "coder"
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass
class Stack:
    """Everything one benchmark invocation runs, with the handles it measures through."""

    redis_url: str
    redis_pid: int
    fake: FakeUpstream
    gateway: Gateway
    key: str
    log_dir: Path

    @property
    def direct_url(self) -> str:
        return self.fake.url + "/chat/completions"

    @property
    def gateway_url(self) -> str:
        return self.gateway.base_url + "/v1/chat/completions"

    def pids(self) -> dict[str, int]:
        """Process ids by role, for profilers and CPU accounting."""
        pids = {"redis": self.redis_pid, "fake": self.fake.process.pid}
        pids.update({f"api-{i}": p.pid for i, p in enumerate(self.gateway.apis)})
        pids.update({f"worker-{i}": p.pid for i, p in enumerate(self.gateway.workers)})
        return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" that ends the command name, utime and stime are the 12th and 13th fields.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


async def redis_commands(redis_url: str) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats): a load-independent cost."""
    async with AsyncRedis.from_url(redis_url) as redis:
        stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def load_average() -> str:
    """The 1/5/15-minute load averages, as `uptime` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


@contextmanager
def running_stack(workers: int = 2, keep_logs: bool = False, repo: Path | None = None,
                  catalog: Callable[[str], str] | None = None, apis: int = 1, **env: str) -> Iterator[Stack]:
    """Start Valkey, the fake upstream (no added latency), `apis` API replicas and `workers` workers.

    `repo`: run the API and workers from another checkout (default: this one). `catalog`: the
    catalog YAML for the fake's URL (default: the tests' catalog).
    """
    log_dir = Path(tempfile.mkdtemp(prefix="ff-bench-"))
    redis_port = free_port()
    server = start_server(redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    fake_port = free_port()
    fake_process = spawn([sys.executable, "-m", "bench.fake_upstream", "--port", str(fake_port)], dict(os.environ),
                         log_dir / "fake.log")
    fake = FakeUpstream(url=f"http://127.0.0.1:{fake_port}/v1", process=fake_process)
    gateway: Gateway | None = None
    try:
        wait_http(fake.root + "/_control/requests")
        catalog_path = log_dir / "catalog.yaml"
        catalog_path.write_text((catalog or catalog_yaml)(fake.url))
        # The 100-streams scenario holds 100 streams on one key: above the default per-key cap (64).
        settings = {"FREEFERENCE_MAX_STREAMS_PER_KEY": "1000", **env}
        gateway = Gateway(redis_url=redis_url, env=base_env(redis_url, catalog_path, **settings), log_dir=log_dir,
                          **({"repo": repo} if repo is not None else {}))
        for _ in range(workers):
            gateway.start_worker()
        for _ in range(apis):
            gateway.start_api()
        gateway.wait_ready(workers)
        key = gateway.create_key("pro", name="bench")
        yield Stack(redis_url=redis_url, redis_pid=server.pid, fake=fake, gateway=gateway, key=key,
                    log_dir=log_dir)
    finally:
        if gateway is not None:
            gateway.stop()
        for process in (fake_process, server):
            process.terminate()
            process.wait(timeout=10)
        if not keep_logs:
            for path in log_dir.iterdir():
                path.unlink()
            log_dir.rmdir()


# --- Timed requests. Both targets get byte-identical work from the same client code, so the
# client's own cost cancels out of "gateway minus direct".
PROMPT = [{"role": "user", "content": "Say hello to the gateway."}]
# The fake marks direct calls with this Authorization header (the gateway sends its provider key),
# so its request log tells which path every upstream call came from.
DIRECT_AUTH = "Bearer bench-direct"


@dataclass(frozen=True)
class Target:
    """One way to reach the fake upstream: straight, or through the gateway."""

    name: str
    url: str
    headers: dict[str, str]
    model: str | None  # None: let the gateway auto-route
    upstream_model: str  # what the fake sees, which names its reply tokens

    def body(self, stream: bool, max_tokens: int) -> bytes:
        data: dict[str, Any] = {"messages": PROMPT, "max_tokens": max_tokens, "stream": stream}
        if self.model is not None:
            data["model"] = self.model
        return orjson.dumps(data)


def targets(stack: Stack, gateway_model: str | None = None, upstream_model: str = AUTO_MODEL) -> tuple[Target, Target]:
    """(direct, gateway) targets that end on the same upstream model."""
    direct = Target("direct", stack.direct_url, {"Authorization": DIRECT_AUTH, "Content-Type": "application/json"},
                    upstream_model, upstream_model)
    via = Target("gateway", stack.gateway_url, {"Authorization": f"Bearer {stack.key}",
                                                "Content-Type": "application/json"}, gateway_model, upstream_model)
    return direct, via


class BadAnswer(Exception):
    """A response that was not the complete, in-order answer the fake produces."""


def stream_contents(raw: bytes) -> tuple[list[str], bool]:
    """The content deltas of an SSE body in arrival order, and whether it ended with [DONE]."""
    pieces: list[str] = []
    done = False
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            done = True
            continue
        chunk = orjson.loads(data)
        if "error" in chunk:
            raise BadAnswer(f"in-band error: {chunk['error'].get('code')}")
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                pieces.append(content)
    return pieces, done


def check_stream(raw: bytes, expected: Sequence[str]) -> None:
    """BadAnswer unless the SSE body carries exactly the `expected` tokens, in order, then [DONE].

    The text is compared whole, not delta by delta: a worker whose publishing falls behind joins
    a stream's queued text deltas into one (workers/coalesce.py), which keeps every character
    and its order but not where one delta ended.
    """
    pieces, done = stream_contents(raw)
    text, wanted = "".join(pieces), "".join(expected)
    if text != wanted or not done:
        raise BadAnswer(f"stream incomplete or out of order ({len(text)}/{len(wanted)} characters in "
                        f"{len(pieces)} deltas, done={done})")


def _error_code(body: bytes) -> str:
    """The OpenAI error code of an error body, for failure reports (never the message text)."""
    try:
        return str(orjson.loads(body)["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "(no OpenAI error body)"


async def timed_call(client: httpx.AsyncClient, target: Target, stream: bool, max_tokens: int) -> float:
    """Seconds to the whole answer (non-streaming) or to the first SSE event (streaming).

    The whole answer is always read and checked against the fake's numbered tokens: a stream
    counts only if every token arrived, in order, followed by [DONE] (check_stream).
    """
    expected = reply_tokens(target.upstream_model, max_tokens)
    body = target.body(stream, max_tokens)
    started = time.perf_counter()
    if not stream:
        response = await client.post(target.url, content=body, headers=target.headers)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise BadAnswer(f"HTTP {response.status_code} {_error_code(response.content)}")
        content = orjson.loads(response.content)["choices"][0]["message"]["content"]
        if content != "".join(expected):
            raise BadAnswer("wrong completion content")
        return elapsed
    first_event_s: float | None = None
    received = bytearray()
    async with client.stream("POST", target.url, content=body, headers=target.headers) as response:
        if response.status_code != 200:
            raise BadAnswer(f"HTTP {response.status_code} {_error_code(await response.aread())}")
        async for raw in response.aiter_raw():
            if first_event_s is None and b"data:" in raw:
                first_event_s = time.perf_counter() - started
            received += raw
    check_stream(bytes(received), expected)
    if first_event_s is None:
        raise BadAnswer("stream without a data event")
    return first_event_s


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples."""
    ordered = sorted(samples)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def upstream_calls(fake: FakeUpstream) -> dict[str, int]:
    """How many calls the fake has seen since its last reset, direct vs through the gateway."""
    counts = {"direct": 0, "gateway": 0}
    for entry in fake.requests():
        counts["direct" if entry["authorization"] == DIRECT_AUTH else "gateway"] += 1
    return counts
