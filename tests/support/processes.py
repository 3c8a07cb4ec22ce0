"""Real processes for integration tests: Redis, the fake upstream, API replicas, workers."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from redis import Redis

from api.keys import KeyLimits, create_key
from cli.embedded_redis import free_port, start_server

REPO = Path(__file__).resolve().parents[2]


def wait_http(url: str, timeout_s: float = 20.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=1.0)
            if response.status_code == status:
                return
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} in {timeout_s}s (last: {last!r})")


def spawn(args: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path = REPO) -> subprocess.Popen[bytes]:
    """Start a process logging to log_path; `python -m` runs the code of the checkout at `cwd`."""
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the process for its lifetime
    return subprocess.Popen(list(args), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


def _listening_inodes(port: int) -> set[str] | None:
    """Inodes of the sockets listening on a TCP port (Linux /proc); None where /proc has no answer."""
    found: set[str] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.add(fields[9])
    return found if readable else None


def _listening(process: subprocess.Popen[bytes], port: int, timeout_s: float = 30.0) -> bool:
    """Wait until `process` itself listens on `port`; False if it exits first (the port was taken)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        inodes = _listening_inodes(port)
        if inodes is None:
            return True  # no /proc: trust the health check that follows
        try:
            sockets = {os.readlink(f"/proc/{process.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{process.pid}/fd")}
        except OSError:
            sockets = set()
        if {f"socket:[{inode}]" for inode in inodes} & sockets:
            return True
        time.sleep(0.05)
    return False


@dataclass
class FakeUpstream:
    """Handle on a running bench.fake_upstream process."""

    url: str  # base URL including /v1
    process: subprocess.Popen[bytes]

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def _post(self, path: str, body: dict[str, Any]) -> None:
        httpx.post(self.root + path, json=body, timeout=5).raise_for_status()

    def script(self, model: str, *faults: dict[str, Any]) -> None:
        """The next requests for `model` get these behaviours, in order."""
        self._post("/_control/script", {"model": model, "faults": list(faults)})

    def set_default(self, model: str, fault: dict[str, Any] | None) -> None:
        self._post("/_control/default", {"model": model, "fault": fault})

    def set_models(self, models: list[str] | list[dict[str, Any]] | None) -> None:
        """What GET /models lists: ids, or {"id", "context", "free", "tools", "json", "structured", "vision"}
        (bench/fake_dialects.py)."""
        self._post("/_control/models", {"models": models})

    def set_rpm(self, model: str, rpm: int | None, retry_after: bool = True) -> None:
        """At most `rpm` requests a minute for `model` (429 past it, with Retry-After unless told not
        to); None lifts it."""
        self._post("/_control/rpm", {"model": model, "rpm": rpm, "retry_after": retry_after})

    def set_bad_keys(self, keys: list[str]) -> None:
        """Requests carrying one of these upstream keys are answered 401."""
        self._post("/_control/bad_keys", {"keys": keys})

    def reset(self) -> None:
        self._post("/_control/reset", {})

    def requests(self, model: str | None = None) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = httpx.get(self.root + "/_control/requests", timeout=5).json()["requests"]
        return [r for r in seen if model is None or r["model"] == model]


@dataclass
class Gateway:
    """API replicas + workers sharing one Redis, started as real processes."""

    redis_url: str
    env: dict[str, str]
    log_dir: Path
    api_ports: list[int] = field(default_factory=list)
    apis: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    repo: Path = REPO  # whose code the processes run (bench/ab_compare.py runs another checkout)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_ports[0]}"

    def url(self, replica: int = 0) -> str:
        return f"http://127.0.0.1:{self.api_ports[replica]}"

    def start_api(self) -> int:
        # A port free when picked may be taken before the API binds it (other test sessions run
        # on this machine): then another server would answer in its place. So the API must be
        # seen listening on it itself, else it is started again on another port.
        for _ in range(3):
            port = free_port()
            args = [sys.executable, "-m", "cli.main", "api", "--port", str(port)]
            process = spawn(args, self.env, self.log_dir / f"api-{port}.log", self.repo)
            if _listening(process, port):
                break
            process.kill()
            process.wait()
        else:
            raise RuntimeError(f"no API process could bind a port; see {self.log_dir}")
        self.apis.append(process)
        self.api_ports.append(port)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        return port

    def start_worker(self) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        process = spawn([sys.executable, "-m", "cli.main", "worker"], self.env, self.log_dir / f"worker-{n}.log",
                        self.repo)
        self.workers.append(process)
        return process

    def wait_ready(self, workers: int | None = None, timeout_s: float = 20.0) -> None:
        expected = len([w for w in self.workers if w.poll() is None]) if workers is None else workers
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                body = httpx.get(self.base_url + "/readyz", timeout=1).json()
                if body.get("workers", 0) >= expected and body.get("status") == "ready":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway not ready with {expected} workers")

    def create_key(self, tier: str = "free", name: str = "test", **limits: int) -> str:
        async def go() -> str:
            from redis.asyncio import Redis as AsyncRedis

            async with AsyncRedis.from_url(self.redis_url) as redis:
                key, _ = await create_key(redis, name=name, tier=tier, limits=KeyLimits(**limits))
                return key

        return asyncio.run(go())

    def client(self, key: str, replica: int = 0, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url(replica) + "/v1", api_key=key, max_retries=0, **kwargs)

    def stop(self) -> None:
        for process in [*self.apis, *self.workers]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.apis, *self.workers]:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.log_dir.glob("*.log")))


class OwnRedis:
    """A server this test owns, so it may stop and restart it on the same port (AOF keeps the keys)."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.process = start_server(self.port, data_dir=data_dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def start(self) -> None:
        self.process = start_server(self.port, data_dir=self.data_dir)


def catalog_yaml(upstream_url: str, models: list[dict[str, Any]] | None = None,
                 providers: list[dict[str, Any]] | None = None) -> str:
    """A test catalog: two providers on the fake upstream, models ranked per intent."""
    import yaml

    providers = providers or [
        {"id": "fake-a", "base_url": upstream_url, "api_keys_env": ["FAKE_A_KEY"],
         "timeout": {"connect_s": 1, "first_token_s": 2, "idle_s": 2, "total_s": 20}},
        {"id": "fake-b", "base_url": upstream_url, "requires_key": False,
         "timeout": {"connect_s": 1, "first_token_s": 2, "idle_s": 2, "total_s": 20}},
    ]
    models = models or [
        {"id": "general-best", "provider": "fake-a", "upstream_name": "general-best", "context_window": 8192,
         "capabilities": ["chat", "tools"], "scores": {"general": 0.9, "code": 0.5, "reasoning": 0.5},
         "supports_prefill": True},
        {"id": "general-backup", "provider": "fake-b", "upstream_name": "general-backup", "context_window": 32768,
         "capabilities": ["chat"], "scores": {"general": 0.8, "code": 0.4, "reasoning": 0.4},
         "supports_prefill": True},
        {"id": "coder", "provider": "fake-a", "upstream_name": "coder", "context_window": 16384,
         "capabilities": ["chat", "code"], "scores": {"code": 0.9, "general": 0.6, "reasoning": 0.6}},
        {"id": "reasoner", "provider": "fake-b", "upstream_name": "reasoner", "context_window": 16384,
         "capabilities": ["chat", "reasoning"], "scores": {"reasoning": 0.9, "general": 0.6, "code": 0.6}},
        {"id": "embedder", "provider": "fake-b", "upstream_name": "embedder", "context_window": 8192,
         "capabilities": ["embeddings", "dimensions", "token_input"]},
    ]
    data = {
        "providers": providers,
        "models": models,
        "capabilities": {
            "text-basic": {"name": "General Chat Model", "intent": "general"},
            "code": {"name": "Code Model", "intent": "code"},
            "reasoning": {"name": "Reasoning Model", "intent": "reasoning"},
            "embedding": {"name": "Embedding Model", "endpoint": "embeddings"},
        },
    }
    return yaml.safe_dump(data, sort_keys=False)


def base_env(redis_url: str, catalog_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEFERENCE_")}
    env.update({
        "FREEFERENCE_REDIS_URL": redis_url,
        "FREEFERENCE_CATALOG": str(catalog_path),
        "FREEFERENCE_MASTER_KEY": "test-master-key-0123456789",
        "FREEFERENCE_PICKUP_TIMEOUT_S": "2",
        "FREEFERENCE_REQUEST_TIMEOUT_S": "30",
        "FREEFERENCE_WORKER_DRAIN_S": "10",
        # Tier defaults far above any test's traffic; limit tests give their keys their own limits.
        "FREEFERENCE_FREE_RPM": "100000", "FREEFERENCE_FREE_TPM": "100000000", "FREEFERENCE_FREE_RPD": "1000000",
        "FREEFERENCE_PRO_RPM": "100000", "FREEFERENCE_PRO_TPM": "100000000", "FREEFERENCE_PRO_RPD": "1000000",
        "FREEFERENCE_FREE_BATCH_QUEUED_LINES": "1000000", "FREEFERENCE_PRO_BATCH_QUEUED_LINES": "1000000",
        "FAKE_A_KEY": "sk-fake-a-0123456789",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def flush(redis_url: str) -> None:
    with Redis.from_url(redis_url) as redis:
        redis.flushdb()


def worker_loads(redis_url: str) -> dict[int, int]:
    """pid → running jobs, from the workers' heartbeat keys (refreshed every heartbeat)."""
    import orjson

    from workers.protocol import WORKER_HEARTBEAT_PREFIX

    loads: dict[int, int] = {}
    with Redis.from_url(redis_url) as redis:
        for key in redis.scan_iter(match=WORKER_HEARTBEAT_PREFIX + "*"):
            raw = redis.get(key)
            if raw:
                info = orjson.loads(raw)
                loads[int(info["pid"])] = int(info["running"])
    return loads


@dataclass
class StreamProbe:
    """One streaming SDK request run in a thread, recording what the caller saw and when."""

    client: openai.OpenAI
    max_tokens: int
    pieces: list[str] = field(default_factory=list)
    error: Exception | None = None
    first_at: float | None = None
    ended_at: float | None = None
    thread: Any = None

    def start(self) -> "StreamProbe":
        import threading

        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            stream = self.client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "Count for me."}],
                max_tokens=self.max_tokens, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    self.first_at = self.first_at or time.monotonic()
                    self.pieces.append(chunk.choices[0].delta.content)
        except Exception as exc:  # recorded for the test to assert on
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    """Poll condition() until true, else fail with `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def batch_jsonl(count: int, prefix: str = "req", **body: Any) -> bytes:
    """A Batch API input file of `count` chat lines with custom ids prefix-0 … prefix-(count-1)."""
    import orjson

    lines = [orjson.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "auto", "messages": [{"role": "user", "content": f"line {i}"}],
                                    **body}})
             for i in range(count)]
    return b"\n".join(lines) + b"\n"


def wait_batch(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout_s: float) -> Any:
    """Poll client.batches.retrieve until the batch reaches one of `statuses`; returns it."""
    deadline = time.monotonic() + timeout_s
    batch = client.batches.retrieve(batch_id)
    while batch.status not in statuses:
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.status} ({batch.request_counts}) after {timeout_s}s")
        time.sleep(0.1)
        batch = client.batches.retrieve(batch_id)
    return batch


MetricSamples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(gateway: Gateway, replica: int = 0) -> MetricSamples:
    """One /metrics scrape of an API replica: (sample name, sorted labels) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(gateway.url(replica) + "/metrics", timeout=5)
    response.raise_for_status()
    out: MetricSamples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric_total(samples: MetricSamples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))
