"""Upstream bodies are read up to caps: a provider answering with hundreds of MB cannot grow a worker.

The fake sends 300 MB (an error body, a whole JSON answer, one endless SSE line) without ever
holding it; the worker reads up to its cap, closes the connection and fails over. Its peak
resident memory (VmHWM, from /proc) stays far below what reading such a body whole would take.
"""

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_failover_support import FAST_ENV, ask, failover_catalog, forget_health
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

HUGE = 300 * 1024 * 1024
# A worker at rest is well under 150 MB here; reading one 300 MB body whole took ~2 GB.
PEAK_BOUND_BYTES = 400 * 1024 * 1024


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway], fake_upstream: FakeUpstream) -> Gateway:
    return module_gateway_factory(workers=1, catalog=failover_catalog(fake_upstream.url), **FAST_ENV)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read a process's peak memory")
@pytest.mark.parametrize(("fault", "attempts"), [
    ({"huge_body": HUGE, "status": 500}, "3"),  # a provider error: retried once, then the next model
    ({"huge_body": HUGE, "status": 200}, "2"),  # a whole JSON answer over the cap: a broken answer
    ({"huge_body": HUGE, "status": 200, "content_type": "text/event-stream"}, "2"),  # one endless SSE line
], ids=["error-500", "json-200", "sse-line"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_huge_upstream_body_fails_over_and_the_worker_stays_small(gateway: Gateway, upstream: FakeUpstream,
                                                                    fault: dict, attempts: str, stream: bool) -> None:
    forget_health(gateway)  # each case starts with closed breakers
    upstream.script("general-best", fault, fault)
    key = gateway.create_key("free")
    answer = ask(gateway, key, stream)
    assert answer.model == "general-backup"
    assert answer.headers["x-freeference-attempts"] == attempts
    sent = [r.get("bytes_sent", 0) for r in upstream.requests("general-best")]
    assert all(b < HUGE for b in sent)  # the worker hung up long before the end
    assert peak_rss_bytes(gateway.workers[0].pid) < PEAK_BOUND_BYTES
