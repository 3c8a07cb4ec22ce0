"""A stream's stall deadline on one timer per stream, moved lazily.

`asyncio.timeout_at` around every network read arms and cancels a timer for every read of
every stream: about a tenth of a worker's CPU with 1,000 streams open (docs/performance.md).
Here the deadline is a number the reader moves forward as data arrives; the stream's one timer
fires at the deadline it was armed for, re-arms itself at the moved one, and cancels the task
only when it is past its deadline while waiting in a read: what asyncio.timeout does, with one
timer per idle gap instead of one per read.
"""

import asyncio

__all__ = ["StallTimer"]


class StallTimer:
    """Times out reads of the current task that wait past `deadline` (a loop time).

    Use: `begin()` right before a read that may wait, `end()` right after it (in a finally),
    and on a CancelledError from that read ask `timed_out()`; `close()` once the stream is over.
    """

    __slots__ = ("_cancelling", "_fired", "_handle", "_loop", "_task", "deadline", "reading")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("StallTimer needs a running task")
        self._loop = loop
        self._task = task
        self.deadline = deadline
        self.reading = False
        self._fired = False
        self._cancelling = 0
        self._handle: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        """A read that may wait starts now."""
        self.reading = True
        if self._handle is None:  # the first read, or the deadline passed while the task did other work
            self._handle = self._loop.call_at(self.deadline, self._check)

    def end(self) -> None:
        self.reading = False

    def timed_out(self) -> bool:
        """After a CancelledError in a read: True when this timer caused it (its cancel is then undone).

        False for any other cancel, which the caller re-raises: a cancel of the task that came
        at the same time as the timeout still wins, as with asyncio.timeout.
        """
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        if self._loop.time() < self.deadline:  # data came meanwhile: wait for the moved deadline
            self._handle = self._loop.call_at(self.deadline, self._check)
        elif self.reading:
            self._fired = True
            self._cancelling = self._task.cancelling()
            self._task.cancel()
        # Otherwise the task is busy elsewhere (handing a chunk on): begin() re-arms, due at once
        # if no data came, while data already received is still read first.
