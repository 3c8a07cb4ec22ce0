"""How many batch lines a worker runs at once: adapted to how responsive its event loop is.

Batch lines share the worker's event loop (and the machine's CPU) with live requests. When the
loop falls behind, every live request on it waits longer, at every step. So the runner watches
the loop's lag (how late a short sleep wakes up) and adapts its batch concurrency like TCP does
its window: one more line per calm sample, a 30 % cut per late one (AIMD). On an idle machine
talking to network-bound providers the lag stays near zero and batches run at full concurrency;
on a CPU-starved one they back off to a trickle and live traffic keeps its latency.
"""

import asyncio

SAMPLE_INTERVAL_S = 0.05
_DECREASE = 0.7


class LagGovernor:
    """AIMD limit on batch lines in flight, driven by event-loop lag samples."""

    def __init__(self, max_lines: int, target_lag_s: float) -> None:
        self.max_lines = max_lines
        self.target_lag_s = target_lag_s
        # Disabled (target 0): always the maximum. Else start low and earn the rest.
        self.limit = max_lines if target_lag_s <= 0 else max(1, max_lines // 4)
        self.lag_s = 0.0

    def observe(self, lag_s: float) -> None:
        """Adjust the limit to one lag sample."""
        self.lag_s = lag_s
        if self.target_lag_s <= 0:
            return
        if lag_s > self.target_lag_s:
            self.limit = max(1, int(self.limit * _DECREASE))
        elif lag_s < self.target_lag_s / 2:
            self.limit = min(self.max_lines, self.limit + 1)

    async def watch(self) -> None:
        """Sample the loop's lag forever (run as a task next to the runner)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            self.observe(max(loop.time() - started - SAMPLE_INTERVAL_S, 0.0))
