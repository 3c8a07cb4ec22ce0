"""Crash behaviour with real processes: a worker SIGKILLed or SIGTERMed mid-request, an API killed mid-stream."""

import contextlib
import signal
import subprocess
import threading
import time

import openai
import pytest

from bench.fake_upstream import reply_tokens
from tests.support.processes import FakeUpstream, Gateway, StreamProbe, wait_for, worker_loads

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello."}]
SLOW = {"token_interval_s": 0.25}  # a 20-token stream lasts about 5 s


def _busiest(gateway: Gateway, total: int) -> tuple[subprocess.Popen[bytes], int]:
    """The worker process holding the most of `total` running jobs, and how many it holds."""
    wait_for(lambda: sum(worker_loads(gateway.redis_url).values()) == total, 10, f"{total} running jobs")
    loads = worker_loads(gateway.redis_url)
    pid = max(loads, key=lambda p: loads[p])
    process = next(w for w in gateway.workers if w.pid == pid)
    return process, loads[pid]


def _assert_serves(gateway: Gateway, key: str) -> None:
    client = gateway.client(key, timeout=10)
    reply = client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content == "".join(reply_tokens("general-best", 4))
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=4, stream=True)
              if c.choices]
    assert "".join(pieces) == "".join(reply_tokens("general-best", 4))


@pytest.fixture
def gateway(gateway_factory) -> Gateway:
    return gateway_factory(workers=2)


def test_worker_sigkill_mid_stream_ends_streams_fast_and_others_flow(gateway: Gateway,
                                                                     upstream: FakeUpstream) -> None:
    key = gateway.create_key("free")
    upstream.set_default("general-best", SLOW)
    probes = [StreamProbe(gateway.client(key, timeout=30), max_tokens=20).start() for _ in range(4)]
    wait_for(lambda: all(p.first_at for p in probes), 15, "first tokens of every stream")
    victim, held = _busiest(gateway, 4)
    victim.kill()
    killed_at = time.monotonic()
    for probe in probes:
        probe.join(30)
    expected = reply_tokens("general-best", 20)
    lost = [p for p in probes if p.error is not None]
    whole = [p for p in probes if p.error is None]
    # Exactly the victim's streams fail, each with a clear in-band error within seconds ...
    assert len(lost) == held
    for probe in lost:
        assert isinstance(probe.error, openai.APIError)
        assert "worker" in str(probe.error).lower()
        assert probe.ended_at is not None and probe.ended_at - killed_at < 8
        assert probe.pieces == expected[: len(probe.pieces)]  # a prefix: nothing duplicated
    # ... and the other worker's streams finish whole.
    for probe in whole:
        assert probe.pieces == expected
    upstream.set_default("general-best", None)
    _assert_serves(gateway, key)


def test_worker_sigkill_before_answer_reruns_on_the_other_worker(gateway: Gateway,
                                                                 upstream: FakeUpstream) -> None:
    key = gateway.create_key("free")
    upstream.script("general-best", {"delay_s": 6})  # only the first attempt is slow
    client = gateway.client(key, timeout=30)
    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["reply"] = client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=5)
        except openai.APIError as exc:
            result["error"] = exc
        result["at"] = time.monotonic()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    victim, _ = _busiest(gateway, 1)
    victim.kill()
    killed_at = time.monotonic()
    thread.join(30)
    assert "error" not in result, result.get("error")
    reply = result["reply"]
    assert isinstance(reply, openai.types.chat.ChatCompletion)
    assert reply.choices[0].message.content == "".join(reply_tokens("general-best", 5))
    assert float(result["at"]) - killed_at < 8
    assert len(upstream.requests("general-best")) == 2  # the lost attempt and its one re-run


def test_worker_sigterm_finishes_in_flight_streams(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.create_key("free")
    upstream.set_default("general-best", {"token_interval_s": 0.2})
    probes = [StreamProbe(gateway.client(key, timeout=30), max_tokens=15).start() for _ in range(4)]
    wait_for(lambda: all(p.first_at for p in probes), 15, "first tokens of every stream")
    victim, held = _busiest(gateway, 4)
    assert held > 0
    victim.send_signal(signal.SIGTERM)
    # While it drains, new requests go to the other worker.
    upstream.set_default("general-best", None)
    _assert_serves(gateway, key)
    for probe in probes:
        probe.join(30)
    expected = reply_tokens("general-best", 15)
    for probe in probes:
        assert probe.error is None, probe.error
        assert probe.pieces == expected  # every token once, in order
    assert victim.wait(timeout=15) == 0
    assert len(upstream.requests("general-best")) == 4 + 2  # nothing re-run


def test_worker_sigterm_past_its_drain_time_stops_streams_and_exits_cleanly(gateway_factory,
                                                                          upstream: FakeUpstream) -> None:
    # A stream longer than the drain time is cancelled at shutdown: its caller gets a clear
    # in-band error, the upstream call is closed, and the worker still finishes its shutdown
    # (exit code 0, not a traceback out of arq's close()).
    gateway = gateway_factory(workers=1, FREEFERENCE_WORKER_DRAIN_S="0.5")
    key = gateway.create_key("free")
    upstream.set_default("general-best", {"token_interval_s": 0.2})
    probe = StreamProbe(gateway.client(key, timeout=30), max_tokens=100).start()
    wait_for(lambda: probe.first_at is not None, 15, "first token")
    worker = gateway.workers[0]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    probe.join(15)
    assert probe.error is not None  # ended with an error, never presented as a whole answer
    assert len(probe.pieces) < 100
    wait_for(lambda: upstream.requests("general-best")[0].get("outcome") == "client_disconnected", 5,
             "the upstream stream to be closed")


def test_api_killed_mid_stream_leaves_no_upstream_call(gateway_factory, upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=1, apis=2)
    key = gateway.create_key("free")
    upstream.set_default("general-best", {"token_interval_s": 0.1})
    doomed = StreamProbe(gateway.client(key, replica=1, timeout=30), max_tokens=200).start()
    wait_for(lambda: doomed.first_at is not None, 15, "first token")
    gateway.apis[1].kill()
    wait_for(lambda: upstream.requests("general-best")[0].get("outcome") == "client_disconnected", 5,
             "the worker to close its upstream stream")
    entry = upstream.requests("general-best")[0]
    assert entry["chunks_sent"] < 100
    upstream.set_default("general-best", None)
    _assert_serves(gateway, key)  # replica 0 and the worker carry on


def test_api_killed_during_a_silent_job_stops_the_upstream_call(gateway_factory, upstream: FakeUpstream) -> None:
    # A non-streaming job publishes nothing until its answer is whole: the worker must still
    # notice that nobody waits for it any more (its reply channel has no subscriber).
    gateway = gateway_factory(workers=1, apis=2)
    key = gateway.create_key("free")
    upstream.set_default("general-best", {"token_interval_s": 0.2})  # 100 tokens: 20 s upstream

    def call() -> None:
        with contextlib.suppress(openai.APIError):
            gateway.client(key, replica=1, timeout=30).chat.completions.create(
                model="auto", messages=MESSAGES, max_tokens=100)

    threading.Thread(target=call, daemon=True).start()
    wait_for(lambda: upstream.requests("general-best") and
             upstream.requests("general-best")[0].get("chunks_sent", 0) > 0, 15, "the upstream call to start")
    gateway.apis[1].kill()
    wait_for(lambda: upstream.requests("general-best")[0].get("outcome") == "client_disconnected", 8,
             "the worker to give up the upstream call")
    assert upstream.requests("general-best")[0]["chunks_sent"] < 60


def test_api_sigterm_lets_open_streams_finish(gateway_factory, upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=1, apis=2)
    key = gateway.create_key("free")
    upstream.set_default("general-best", {"token_interval_s": 0.15})
    probe = StreamProbe(gateway.client(key, replica=1, timeout=30), max_tokens=15).start()
    wait_for(lambda: probe.first_at is not None, 15, "first token")
    gateway.apis[1].send_signal(signal.SIGTERM)
    probe.join(30)
    assert probe.error is None, probe.error
    assert probe.pieces == reply_tokens("general-best", 15)
    assert gateway.apis[1].wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
