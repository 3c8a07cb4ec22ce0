"""The README's examples, run as a newcomer would paste them, against `freeference serve --demo`.

Every ```bash and ```python block of README.md runs, in order, in one shell in a fresh
directory that has the gateway's `.venv` (as the repository checkout has): a Python block names
its file on its first line (`# hello.py`), is saved under that name, and runs where the README
says to run it. Only a block preceded by an HTML comment saying "not run by
tests/integration/test_readme.py: <why>" is skipped: `make serve` itself (this test starts the
same gateway) and `make test` (what runs this test), and what needs real provider keys. The
one difference from a reader's shell: the gateway listens on a free port instead of 8000, so
"127.0.0.1:8000" in the blocks (and the batch CLI's default URL) point there, and it keeps its
data in a private store and data directory.
"""

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.batch_cmd import DEFAULT_BASE_URL
from cli.embedded_redis import free_port, start_server
from tests.support.processes import REPO
from tests.support.serve import Serve, serve_env, start_serve

pytestmark = pytest.mark.integration

README_URL = "127.0.0.1:8000"
SKIP_MARK = "not run by tests/integration/test_readme.py"
_FENCE = re.compile(r"(?:<!--(?P<note>[^>]*)-->\s*\n)?^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```$", re.S | re.M)


@dataclass
class Block:
    lang: str
    body: str
    skipped: bool
    why: str = ""  # the reason a skipped block gives


def readme_blocks(text: str) -> list[Block]:
    """The fenced shell and Python blocks of a README, in order."""
    blocks = []
    for m in _FENCE.finditer(text):
        if m["lang"] in ("bash", "sh", "shell", "python"):
            note = m["note"] or ""
            blocks.append(Block(m["lang"], m["body"], SKIP_MARK in note, note.partition(SKIP_MARK)[2].strip(": ")))
    return blocks


def script_for(blocks: list[Block], workdir: Path, port: int) -> str:
    """One bash script: shell blocks in order, Python blocks saved under the name they give."""
    lines = ["set -euo pipefail"]
    for number, block in enumerate(blocks, start=1):
        if block.skipped:
            continue
        body = block.body.replace(README_URL, f"127.0.0.1:{port}")
        if block.lang == "python":
            name = re.match(r"# (\S+\.py)\n", body)
            assert name, f"README Python block {number} does not name its file on its first line"
            (workdir / name[1]).write_text(body)
            continue
        lines += [f"echo '--- README block {number}'", body]
    return "\n".join(lines) + "\n"


def test_the_readme_has_runnable_examples() -> None:
    blocks = readme_blocks((REPO / "README.md").read_text())
    skipped = [b for b in blocks if b.skipped]
    assert "make serve" in skipped[0].body  # the two commands themselves
    assert all(b.why for b in skipped)  # and each block left out says why
    run = [b for b in blocks if not b.skipped]
    assert len(run) > 3 * len(skipped)
    assert any(b.lang == "python" for b in run) and any("curl" in b.body for b in run)
    assert any("freeference batch submit" in b.body for b in run)
    # The batch CLI's default URL is where `make serve` listens (the README relies on it).
    assert f"http://{README_URL}/v1" == DEFAULT_BASE_URL


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Serve, dict[str, str]]]:
    port = free_port()
    store = start_server(port)
    env = serve_env(FREEFERENCE_REDIS_URL=f"redis://127.0.0.1:{port}/0", FREEFERENCE_DATA_DIR=str(tmp_path / "data"))
    served = start_serve("--demo", env=env)
    try:
        served.demo_key()
        yield served, env
    finally:
        served.stop()
        store.terminate()
        store.wait(timeout=10)


def test_every_readme_example_works_as_pasted(gateway: tuple[Serve, dict[str, str]], tmp_path: Path) -> None:
    served, env = gateway
    workdir = tmp_path / "newcomer"
    workdir.mkdir()
    # The checkout's virtualenv, as `make serve` left it (the one running these tests).
    (workdir / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    script = script_for(readme_blocks((REPO / "README.md").read_text()), workdir, served.port)
    shell_env = {**env, "FREEFERENCE_BASE_URL": f"{served.base_url}/v1", "FREEFERENCE_LOG_LEVEL": "WARNING"}
    shell_env.pop("FREEFERENCE_API_KEY", None)
    done = subprocess.run(["bash", "-c", script], cwd=workdir, env=shell_env, capture_output=True, text=True,
                          timeout=300, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert '"error":' not in done.stdout and "Traceback" not in out, out[-4000:]
    assert "simulated" in done.stdout  # the answers came from the demo's simulated provider
    assert "completed 2 / failed 0 / total 2" in done.stdout  # the batch example
    assert len((workdir / "results.jsonl").read_text().splitlines()) == 2
    assert "population=" in done.stdout  # the structured-output example: parsed by the SDK into its model
