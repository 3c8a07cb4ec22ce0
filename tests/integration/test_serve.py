"""`freeference serve`: the one-command gateway answers, then stops cleanly with its embedded store."""

import os
import signal
import subprocess
import sys
import tempfile

import httpx
import pytest

from cli.embedded_redis import answers, free_port, host_port
from settings.config import DEFAULT_REDIS_URL
from tests.support.processes import REPO, wait_http

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", ["SIGTERM to serve", "Ctrl-C in its terminal"])
def test_serve_answers_then_stops_cleanly_and_stops_its_store_last(how: str) -> None:
    host, port = host_port(DEFAULT_REDIS_URL)
    if answers(host, port):
        pytest.skip(f"an embedded store already runs at {host}:{port}; serve would use it and leave it")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEFERENCE_")}
    env["XDG_DATA_HOME"] = tempfile.mkdtemp()  # the store's data directory
    api_port = free_port()
    # Its own process group, as a terminal gives it: Ctrl-C there signals the whole group.
    serve = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--demo", "--port", str(api_port)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{api_port}/readyz", timeout_s=30)
        demo_key = ""
        assert serve.stdout is not None
        while not demo_key.startswith("ff-"):
            demo_key = serve.stdout.readline().decode().strip()
        answer = httpx.post(f"http://127.0.0.1:{api_port}/v1/chat/completions", timeout=10,
                            headers={"Authorization": f"Bearer {demo_key}"},
                            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
        assert answer.status_code == 200
        if how == "SIGTERM to serve":
            serve.send_signal(signal.SIGTERM)
        else:
            os.killpg(serve.pid, signal.SIGINT)
        output = serve.communicate(timeout=60)[0].decode()
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    assert serve.returncode == 0
    # The workers and the API write to the store while they shut down: it goes last, so no
    # process ends with a connection error (or prints a traceback).
    assert "Traceback" not in output
    assert not answers(host, port)
