"""Bookkeeping that must not delay an answer: run it beside the response, finish it at shutdown."""

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("freeference.api")


class BackgroundWrites:
    """Tasks started for after-the-answer writes (usage billing), kept until they finish."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` now, beside the caller; it must handle its own errors."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # a reference, so the task is not garbage-collected mid-flight
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for writes in flight, so a clean shutdown loses none."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        if pending:
            log.warning("%d background writes unfinished at shutdown", len(pending))
