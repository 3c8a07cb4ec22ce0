"""Session fixtures: a private Redis-compatible server, the fake upstream, gateway factories."""

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.embedded_redis import free_port, start_server
from tests.support.processes import (
    FakeUpstream,
    Gateway,
    base_env,
    catalog_yaml,
    flush,
    spawn,
    wait_http,
)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """FREEFERENCE_TEST_REDIS_URL if given, else a private server on a free port (never the
    machine's shared Redis, whose data the tests would flush)."""
    given = os.environ.get("FREEFERENCE_TEST_REDIS_URL")
    if given:
        yield given
        return
    port = free_port()
    server = start_server(port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    port = free_port()
    log_dir = tmp_path_factory.mktemp("fake-upstream")
    process = spawn([sys.executable, "-m", "bench.fake_upstream", "--port", str(port)], dict(os.environ),
                    log_dir / "fake.log")
    fake = FakeUpstream(url=f"http://127.0.0.1:{port}/v1", process=process)
    try:
        wait_http(fake.root + "/_control/requests")
        yield fake
    finally:
        process.terminate()
        process.wait(timeout=10)


GatewayFactory = Callable[..., Gateway]
_next_db = iter(range(2, 1_000_000))


def _isolated(redis_url: str, db: int) -> str:
    """Same server, another database: gateways of different tests never share queues or keys
    (pub/sub is server-wide, but every channel name embeds a process or worker id)."""
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


def _start_gateway(started: list[Gateway], redis_url: str, fake_upstream: FakeUpstream, tmp: Path, workers: int,
                   apis: int, catalog: str | None, wait: bool, env: dict[str, str]) -> Gateway:
    """Start a gateway in its own database; it joins `started` first so a failed start is stopped too."""
    db_url = _isolated(redis_url, 2 + next(_next_db) % 14)
    flush(db_url)
    catalog_path = tmp / f"catalog-{len(started)}.yaml"
    catalog_path.write_text(catalog or catalog_yaml(fake_upstream.url))
    log_dir = tmp / f"logs-{len(started)}"
    log_dir.mkdir()
    gateway = Gateway(redis_url=db_url, env=base_env(db_url, catalog_path, **env), log_dir=log_dir)
    started.append(gateway)
    for _ in range(workers):
        gateway.start_worker()
    for _ in range(apis):
        gateway.start_api()
    if wait and workers:
        gateway.wait_ready(workers)
    return gateway


@pytest.fixture
def gateway_factory(redis_url: str, fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[GatewayFactory]:
    """create(workers=2, apis=1, catalog=None, env={}) → a running Gateway; stopped afterwards."""
    started: list[Gateway] = []

    def create(workers: int = 2, apis: int = 1, catalog: str | None = None, wait: bool = True,
               **env: str) -> Gateway:
        fake_upstream.reset()
        return _start_gateway(started, redis_url, fake_upstream, tmp_path, workers, apis, catalog, wait, env)

    yield create
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module")
def shared_gateway(redis_url: str, fake_upstream: FakeUpstream,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One API + two workers for a whole test module (tests reset the fake between them)."""
    tmp = tmp_path_factory.mktemp("gateway")
    db_url = _isolated(redis_url, 1)
    flush(db_url)
    catalog_path = tmp / "catalog.yaml"
    catalog_path.write_text(catalog_yaml(fake_upstream.url))
    gateway = Gateway(redis_url=db_url, env=base_env(db_url, catalog_path), log_dir=tmp)
    gateway.start_worker()
    gateway.start_worker()
    gateway.start_api()
    gateway.wait_ready(2)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def module_gateway_factory(redis_url: str, fake_upstream: FakeUpstream,
                           tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    """Like gateway_factory, for gateways a whole module shares (custom catalog or env)."""
    started: list[Gateway] = []
    tmp = tmp_path_factory.mktemp("module-gateway")

    def create(workers: int = 2, apis: int = 1, catalog: str | None = None, **env: str) -> Gateway:
        return _start_gateway(started, redis_url, fake_upstream, tmp, workers, apis, catalog, True, env)

    yield create
    for gateway in started:
        gateway.stop()


@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    """The fake upstream with no scripts and an empty request log."""
    fake_upstream.reset()
    return fake_upstream


def run_cli(*args: str, env: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
