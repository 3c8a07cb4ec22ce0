"""`freeference serve` as a real process: its printed lines collected, stopped like a terminal would."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cli.embedded_redis import free_port
from tests.support.processes import REPO, wait_http


def serve_env(**overrides: str) -> dict[str, str]:
    """The caller's environment without any FREEFERENCE_* setting, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEFERENCE_")}
    env.update({"PYTHONUNBUFFERED": "1", "FREEFERENCE_LOG_LEVEL": "WARNING", **overrides})
    return env


@dataclass
class Serve:
    """One running `freeference serve` (its own process group, as a terminal gives it)."""

    process: subprocess.Popen[bytes]
    port: int
    lines: "queue.Queue[str]" = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def next_line(self, predicate: Callable[[str], bool], timeout_s: float = 30.0) -> str:
        """The next printed line for which predicate(line) is true."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError(f"serve printed no such line in {timeout_s}s:\n" + "\n".join(self.seen)) from None
            if predicate(line):
                return line

    def demo_key(self) -> str:
        """The demo key it printed (alone on its line)."""
        return self.next_line(lambda line: line.startswith("ff-"))

    def output(self) -> str:
        return "\n".join(self.seen)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as a service manager sends; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise


def start_serve(*args: str, env: dict[str, str], cwd: Path = REPO, ready: bool = True) -> Serve:
    """Start `python -m cli.main serve --port P ARGS` and (by default) wait for /readyz."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port), *args], cwd=cwd,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    served = Serve(process, port)

    def pump() -> None:  # drain the pipe so the processes never block on a full one
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            served.seen.append(line)
            served.lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    if ready:
        try:
            wait_http(served.base_url + "/readyz", timeout_s=45)
        except TimeoutError:
            served.stop()
            raise
    return served
