"""A small supervisor: child processes that are restarted when they die, stopped on signals."""

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("freeference.serve")


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    restart: bool = True
    process: subprocess.Popen[bytes] | None = None
    # Stopped only once every other child has exited: the store they all write to while they
    # shut down (arq's clean-up, the workers' last events).
    stop_last: bool = False
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, env=self.env)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Supervisor:
    def __init__(self) -> None:
        self.children: list[Child] = []
        self._stopping = False

    def add(self, child: Child) -> Child:
        child.start()
        self.children.append(child)
        return child

    def run_forever(self) -> int:
        """Restart crashed children (at most 5 a minute each) until SIGINT/SIGTERM."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        while not self._stopping:
            for child in self.children:
                if child.alive() or not child.restart or self._stopping:
                    continue
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60]
                if len(child.restarts) >= 5:
                    log.error("%s keeps crashing; giving up on it", child.name)
                    child.restart = False
                    continue
                code = child.process.returncode if child.process else None
                log.warning("%s exited (code %s); restarting", child.name, code)
                child.restarts.append(now)
                child.start()
            time.sleep(0.2)
        return self.stop()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stopping = True

    def stop(self, grace_s: float = 35.0) -> int:
        """SIGTERM everyone (workers drain their streams), then SIGKILL what is left.

        The children marked stop_last (the embedded store) go after all the others have exited.
        """
        for last in (False, True):
            # The store gets its own few seconds to flush, however long the others took.
            deadline = time.monotonic() + (10.0 if last else grace_s)
            group = [child for child in reversed(self.children) if child.stop_last == last]
            for child in group:
                if child.alive() and child.process:
                    child.process.send_signal(signal.SIGTERM)
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        return 0


def child_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env
