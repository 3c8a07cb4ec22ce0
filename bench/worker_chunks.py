"""The worker's CPU per streamed chunk, alone: upstream read, SSE parse, forwarding, PUBLISH.

    python -m bench.worker_chunks [--streams 1000] [--chunks 40] [--interval-ms 250] [--rounds 3]
    PYTHONPATH=/path/to/other/checkout python -m bench.worker_chunks   (that checkout's code)

bench/concurrent_streams.py measures the whole gateway, where the API, the client and the fake
share the machine with the worker and a worker behind on its loop joins queued text (fewer
PUBLISHes per token): its per-process numbers swing with the machine's load. This one runs the
worker's per-chunk path in one process, as a job does it (OpenAICompatProvider.stream through
the worker's upstream client, stream_attempt, the job's Publisher, the worker's EventPublisher
to a real Valkey with one subscriber process), against the fake upstream in another process,
and reports this process's CPU time per upstream chunk: over each round (requests' start and
end included) and over the window in which every stream only streamed.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import uvloop
from redis.asyncio import Redis

from bench.harness import AUTO_MODEL
from cli.embedded_redis import free_port, start_server
from router.attempt import RunState, stream_attempt
from router.catalog import Deployment, RuntimeCatalog
from router.providers.openai_compat import OpenAICompatProvider
from router.providers.transport import upstream_client
from settings.catalog import CatalogFile
from tests.support.processes import FakeUpstream, wait_http
from workers.events import EventPublisher
from workers.jobs import Publisher
from workers.protocol import ChatJob

CHANNEL = "ff:reply:bench"
# A subscriber in its own process, so PUBLISH has a receiver (0 receivers ends a job).
SUBSCRIBER = "import redis,sys\np=redis.Redis.from_url(sys.argv[1]).pubsub()\np.subscribe(sys.argv[2])\n" \
             "for _ in p.listen(): pass\n"


def deployment(upstream_url: str) -> Deployment:
    file = CatalogFile.model_validate({
        "providers": [{"id": "fake", "base_url": upstream_url, "requires_key": False}],
        "models": [{"id": "m", "provider": "fake", "upstream_name": AUTO_MODEL, "context_window": 100000,
                    "scores": {"general": 0.5}}],
        "capabilities": {"text-basic": {"name": "G", "intent": "general"}},
    })
    return RuntimeCatalog.build(file, {}).deployments[0]


def job() -> ChatJob:
    return ChatJob(job_id=uuid.uuid4().hex, request_id="bench", reply_channel=CHANNEL, body={}, stream=True,
                   requested_model=None, key_id="bench", deadline_unix_ms=0)


async def one_stream(provider: OpenAICompatProvider, target: Deployment, events: EventPublisher, chunks: int,
                     seen: list[int], first: list[int]) -> None:
    out = Publisher(events, job())
    started = False

    async def on_start(_: Deployment, __: int) -> None:
        return None

    async def on_chunk(chunk: dict[str, Any]) -> None:
        nonlocal started
        if not started:
            started = True
            first[0] += 1
        seen[0] += 1
        await out.send_chunk(chunk)

    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": chunks, "stream": True}
    await stream_attempt(provider, target, body, None, 600.0, RunState(), on_start, on_chunk,
                         forward_usage_chunk=False)
    await out.send("done", b"{}")


async def round_of(provider: OpenAICompatProvider, target: Deployment, events: EventPublisher, streams: int,
                   chunks: int) -> tuple[float, float | None]:
    seen, first = [0], [0]
    cpu_start = time.process_time()
    tasks = [asyncio.create_task(one_stream(provider, target, events, chunks, seen, first)) for _ in range(streams)]
    window: tuple[float, int] | None = None
    steady_ms: float | None = None
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.05)
        if window is None and first[0] == streams:
            window = (time.process_time(), seen[0])
        elif window is not None and steady_ms is None and any(t.done() for t in tasks):
            steady_ms = (time.process_time() - window[0]) * 1000 / max(seen[0] - window[1], 1)
    await asyncio.gather(*tasks)
    return (time.process_time() - cpu_start) * 1000 / seen[0], steady_ms


async def run(args: argparse.Namespace, upstream_url: str, redis_url: str) -> None:
    target = deployment(upstream_url)
    redis = Redis.from_url(redis_url)
    events = EventPublisher(redis.connection_pool)
    events.start()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=30)
    async with upstream_client(limits) as client:
        provider = OpenAICompatProvider(client)
        for n in range(args.rounds):
            whole_ms, steady_ms = await round_of(provider, target, events, args.streams, args.chunks)
            steady = f"{steady_ms:.4f}" if steady_ms is not None else "-"
            print(f"  round {n + 1}: {whole_ms:.4f} ms/chunk (whole round), {steady} ms/chunk (streaming only); "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    await events.close()
    await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--interval-ms", type=float, default=250.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    redis_port, fake_port = free_port(), free_port()
    server = start_server(redis_port, persist=False)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    fake_process = subprocess.Popen([sys.executable, "-m", "bench.fake_upstream", "--port", str(fake_port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subscriber = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, redis_url, CHANNEL])
    try:
        fake = FakeUpstream(url=f"http://127.0.0.1:{fake_port}/v1", process=fake_process)
        wait_http(fake.root + "/_control/requests")
        fake.set_default(AUTO_MODEL, {"token_interval_s": args.interval_ms / 1000})
        time.sleep(0.5)  # the subscriber's SUBSCRIBE
        print(f"bench.worker_chunks: {args.streams} streams of {args.chunks} chunks {args.interval_ms:g} ms apart",
              flush=True)
        uvloop.run(run(args, fake.url, redis_url))
    finally:
        for process in (subscriber, fake_process, server):
            process.terminate()
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
