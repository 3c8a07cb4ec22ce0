"""Start-up: configuration errors are one line and exit 2; the demo key is stable per data directory."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.embedded_redis import answers, free_port, host_port
from settings.config import DEFAULT_REDIS_URL
from tests.support.processes import REPO, OwnRedis
from tests.support.serve import Serve, serve_env, start_serve

pytestmark = pytest.mark.integration


def _unreachable() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.mark.parametrize(("command", "env", "names"), [
    (["worker"], {"FREEFERENCE_ENVIRONMENT": "production"}, "FREEFERENCE_MASTER_KEY"),
    (["serve", "--demo"], {"FREEFERENCE_ENVIRONMENT": "production", "FREEFERENCE_MASTER_KEY": "short"},
     "FREEFERENCE_MASTER_KEY"),
    (["api"], {"FREEFERENCE_CATALOG": "/nonexistent/catalog.yaml"}, "FREEFERENCE_CATALOG"),
    (["api"], {"FREEFERENCE_REDIS_URL": _unreachable()}, "FREEFERENCE_REDIS_URL"),
    (["serve"], {"FREEFERENCE_REDIS_URL": _unreachable()}, "FREEFERENCE_REDIS_URL"),
    (["keys", "list"], {"FREEFERENCE_REDIS_URL": "redis://:hunter2secret@127.0.0.1:1/0"}, "FREEFERENCE_REDIS_URL"),
    (["worker"], {"FREEFERENCE_FREE_RPM": "lots"}, "FREEFERENCE_FREE_RPM"),
], ids=["no-master-key", "serve-short-master-key", "unreadable-catalog", "api-redis-down", "serve-redis-down",
        "keys-redis-down", "bad-number"])
def test_configuration_errors_are_one_line_naming_what_to_set(command: list[str], env: dict[str, str],
                                                              names: str) -> None:
    done = subprocess.run([sys.executable, "-m", "cli.main", *command], cwd=REPO, env=serve_env(**env),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("freeference: "), done.stderr
    assert names in done.stderr and "Traceback" not in done.stderr
    assert "hunter2secret" not in done.stderr  # a password in the URL is never printed


def _keys(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", "keys", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def _serve_once(env: dict[str, str], *args: str) -> tuple[str, str]:
    """Start serve, read its demo key, check the key works, stop it; (key, what it printed)."""
    served: Serve = start_serve("--demo", "--workers", "1", *args, env=env)
    try:
        key = served.demo_key()
        answer = httpx.post(served.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"messages": [{"role": "user", "content": "hi"}]}, timeout=20)
        assert answer.status_code == 200, answer.text
        assert "simulated" in answer.json()["choices"][0]["message"]["content"]
        assert _keys(env, "demo").stdout.strip() == key  # the same key, from another shell
    finally:
        assert served.stop() == 0
    return key, served.output()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "store")
    yield server
    server.stop()


def test_one_demo_key_per_data_directory(own_redis: OwnRedis, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = serve_env(FREEFERENCE_REDIS_URL=own_redis.url, FREEFERENCE_DATA_DIR=str(data_dir))
    first, printed = _serve_once(env)
    assert f"demo key file in {data_dir}" in printed
    assert (data_dir / "demo-key").stat().st_mode & 0o777 == 0o600
    again, _ = _serve_once(env)
    assert again == first
    listed = _keys(env, "list").stdout.splitlines()
    assert len(listed) == 1 and '"name": "demo"' in listed[0]  # not one key per start
    # A demo key revoked by its owner is replaced (and the new one kept) at the next start.
    assert _keys(env, "revoke", first).returncode == 0
    replaced, _ = _serve_once(env)
    assert replaced != first and (data_dir / "demo-key").read_text().strip() == replaced


def test_the_embedded_store_keeps_its_data_and_ephemeral_keeps_none(tmp_path: Path) -> None:
    host, port = host_port(DEFAULT_REDIS_URL)
    env = serve_env(XDG_DATA_HOME=str(tmp_path))
    data_dir = tmp_path / "freeference"

    def serve(*args: str) -> tuple[str, str]:
        # The default address is the machine's: a store someone else started there would be used.
        if answers(host, port):
            pytest.skip(f"a store already answers at {host}:{port}: serve would use it")
        key, printed = _serve_once(env, *args)
        if not args and f"Data: {data_dir} " not in printed:
            pytest.skip("another store took the default address meanwhile")
        return key, printed

    first, _ = serve()
    assert (data_dir / "demo-key").is_file()
    assert serve()[0] == first  # the store's append-only file kept the key across the restart

    throwaway, printed = serve("--ephemeral")
    assert throwaway != first and "nothing kept" in printed
    scratch = printed.split("a throwaway store in ", 1)[1].split(",", 1)[0]
    assert not Path(scratch).exists()  # deleted when serve stopped
    assert (data_dir / "demo-key").read_text().strip() == first  # the persistent directory was not touched
