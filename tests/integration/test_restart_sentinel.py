"""Redis Sentinel: a redis+sentinel:// URL, and a primary failover the gateway rides out by itself."""

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from bench.fake_upstream import reply_tokens
from cli.embedded_redis import answers, free_port, server_binary
from settings.redis_url import SentinelTarget, sentinel_target
from tests.support.processes import FakeUpstream, Gateway, base_env, catalog_yaml, wait_for

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello."}]


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([server_binary(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process


def _node(port: int, data_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    process = _start(["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "yes",
                      "--dir", str(data_dir), "--client-output-buffer-limit", "pubsub 0 0 0", *extra])
    wait_for(lambda: answers("127.0.0.1", port), 10, f"valkey on {port}")
    return process


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A primary, one replica and one Sentinel (quorum 1, 1 s to declare the primary down)."""
    primary_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    processes = [_node(primary_port, tmp_path / "primary"),
                 _node(replica_port, tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary_port))]
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor ffmain 127.0.0.1 {primary_port} 1\n"
                    "sentinel down-after-milliseconds ffmain 1000\nsentinel failover-timeout ffmain 5000\n")
    processes.append(_start([str(conf), "--sentinel"]))
    wait_for(lambda: answers("127.0.0.1", sentinel_port), 10, "sentinel")
    try:
        yield {"primary": processes[0], "primary_port": primary_port, "replica_port": replica_port,
               "url": f"redis+sentinel://127.0.0.1:{sentinel_port}/ffmain/0", "sentinel_port": sentinel_port}
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def _serves(gateway: Gateway, key: str) -> None:
    client = gateway.client(key, timeout=15)
    reply = client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content == "".join(reply_tokens("general-best", 4))
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=4, stream=True) if c.choices]
    assert "".join(pieces) == "".join(reply_tokens("general-best", 4))


def _ready(gateway: Gateway) -> bool:
    try:
        return httpx.get(gateway.base_url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_sentinel_url_and_primary_failover(sentinel_setup: dict, upstream: FakeUpstream, tmp_path: Path) -> None:
    primary_url = f"redis://127.0.0.1:{sentinel_setup['primary_port']}/0"
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(catalog_yaml(upstream.url))
    # The gateway only knows the Sentinel URL; the test writes its key straight to the primary.
    gateway = Gateway(redis_url=primary_url, env=base_env(sentinel_setup["url"], catalog), log_dir=tmp_path)
    try:
        gateway.start_worker()
        gateway.start_worker()
        gateway.start_api()
        gateway.wait_ready(2)
        key = gateway.create_key("free")
        _serves(gateway, key)
        with Redis.from_url(primary_url) as primary:
            assert primary.wait(1, 5000) == 1  # the key reached the replica before the primary dies

        sentinel_setup["primary"].kill()
        with Redis(port=sentinel_setup["sentinel_port"]) as sentinel:
            wait_for(lambda: int(sentinel.sentinel_get_master_addr_by_name("ffmain")[1])
                     == sentinel_setup["replica_port"], 30, "Sentinel to promote the replica")
        wait_for(lambda: _ready(gateway), 30, "/readyz on the new primary")
        assert all(p.poll() is None for p in [*gateway.apis, *gateway.workers])  # nobody was restarted
        time.sleep(0.5)
        _serves(gateway, key)
    finally:
        gateway.stop()


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6379/0", None),
    ("redis+sentinel://a:26380,b/main", SentinelTarget([("a", 26380), ("b", 26379)], "main")),
    ("redis+sentinel://user:p%40ss@s1:1/svc/3", SentinelTarget([("s1", 1)], "svc", 3, "user", "p@ss")),
])
def test_sentinel_urls_parse(url: str, expected: SentinelTarget | None) -> None:
    assert sentinel_target(url) == expected


@pytest.mark.parametrize("url", ["redis+sentinel://host:1", "redis+sentinel://host:1/a/0/x", "redis+sentinel:///a"])
def test_malformed_sentinel_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="redis\\+sentinel"):
        sentinel_target(url)
