"""`freeference batch …` against a running gateway: submit --wait with a progress bar, status, download, cancel."""

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support.processes import FakeUpstream, Gateway, batch_jsonl

pytestmark = pytest.mark.integration


def test_submit_wait_download_and_cancel(shared_gateway: Gateway, upstream: FakeUpstream, tmp_path: Path) -> None:
    key = shared_gateway.create_key("free")
    env = {**os.environ, "FREEFERENCE_BASE_URL": shared_gateway.base_url + "/v1", "FREEFERENCE_API_KEY": key}
    env.pop("FREEFERENCE_ENVIRONMENT", None)
    source = tmp_path / "in.jsonl"
    source.write_bytes(batch_jsonl(12, max_tokens=3))
    out = tmp_path / "results.jsonl"

    done = run_cli("batch", "submit", str(source), "--wait", "--output", str(out), "--metadata", "team=qa", env=env)
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.split()[1]
    assert "completed 12 / failed 0 / total 12" in done.stdout
    assert "12/12" in done.stderr  # the tqdm bar: done / total, with rate and ETA
    assert "HTTP Request" not in done.stderr  # no httpx request log between the bar's lines
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == sorted(
        f"req-{i}" for i in range(12))

    status = run_cli("batch", "status", batch_id, env=env)
    assert status.returncode == 0 and f"{batch_id}  completed" in status.stdout
    again = tmp_path / "again.jsonl"
    download = run_cli("batch", "download", batch_id, "--output", str(again), env=env)
    assert download.returncode == 0 and again.read_bytes() == out.read_bytes()

    upstream.set_default("*", {"delay_s": 1.0})
    source.write_bytes(batch_jsonl(300))
    submitted = run_cli("batch", "submit", str(source), env=env)
    assert submitted.returncode == 0, submitted.stderr
    slow_id = submitted.stdout.split()[1]
    cancelled = run_cli("batch", "cancel", slow_id, env=env)
    assert cancelled.returncode == 0 and f"{slow_id}  cancel" in cancelled.stdout

    missing = run_cli("batch", "status", "batch_nope", env=env)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    no_key = run_cli("batch", "list", env={k: v for k, v in env.items() if k != "FREEFERENCE_API_KEY"})
    assert no_key.returncode == 1 and "API key" in no_key.stderr
