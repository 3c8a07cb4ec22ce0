"""What one worker can still take on, from measurement: event-loop lag, CPU, memory per open stream.

A fixed job cap is wrong both ways: 256 refused streams a worker had the CPU for, and a larger
number lets a burst of heavy requests starve every stream the worker already runs. So the
worker measures itself, and its job cap (FREEFERENCE_WORKER_MAX_JOBS) is only a safety ceiling:

- **lag**: how late a short sleep wakes up (the batch runner's gauge, workers/batch_pacing.py),
  the median over the last 150 ms, or more while the next sample is already overdue. While it
  is above FREEFERENCE_WORKER_LOOP_LAG_MAX_MS the worker takes no new job: they wait on the
  queue, within their pickup deadline, for this or another worker.
- **CPU and memory per open job**, learned while the number of running jobs holds steady (few
  starts in a sample), so a burst's one-off start-up work does not count as the jobs' running
  cost. Capacity is FREEFERENCE_WORKER_CPU_MAX of one core (and FREEFERENCE_WORKER_MEMORY_MAX_MB,
  when set) divided by those costs.
- **a steady load that runs late** caps capacity below it (AIMD): on a machine shared with
  other work the process gets less CPU than its share says it could use, and only the lag
  shows it.
- **what it has carried**, until its CPU per job is measured: at most twice the most jobs it
  has run with its loop on time, and FREEFERENCE_WORKER_START_CAPACITY before it has run any.
  A burst on a fresh worker comes before any measurement, and with only the ceiling as its
  room the API admitted thousands of jobs that the worker, once it measured them, could not
  start (they waited out their pickup deadline). It doubles every measurement while the loop
  stays on time.

`room()` is what it may start now; `record()` is the load record it publishes a few times a
second (workers/protocol.py WorkerLoad), from which the API decides to refuse at once when no
worker can take a job soon (api/pool_load.py).
"""

import asyncio
import collections
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from settings import Settings
from workers.batch_pacing import SAMPLE_INTERVAL_S as LAG_SAMPLE_S
from workers.protocol import WorkerLoad

# Lag samples (LAG_SAMPLE_S apart) the lag is the median of: 150 ms, so one late sample (a
# garbage collection) does not stop pickup, and pickup resumes soon after the loop catches up
# (a longer window left the worker idle while a burst waited on the queue).
_LAG_WINDOW = 3
# How often CPU, memory and the start and finish rates are measured.
MEASURE_EVERY_S = 0.25
# Per-job costs are learned only with at least this many jobs running, in samples where at
# most this share of them started (a steady load; a burst's start-up work is not a running cost).
_STEADY_MIN_JOBS = 20
_STEADY_MAX_STARTS = 0.02
_EWMA = 0.3
_DECREASE = 0.7
_INCREASE = 1.05
_IDLE_RELAX = 1.01
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def resident_kb() -> int:
    """This process's resident memory (0 where /proc is not available)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


class CapacityMeter:
    """Measures this worker's load and says how many more jobs it may start."""

    def __init__(self, settings: Settings, running: Callable[[], int]) -> None:
        self._running = running
        self._max_jobs = settings.worker_max_jobs
        self._start_capacity = settings.worker_start_capacity
        # The most jobs it has run with its loop on time: it may take on twice that.
        self.carried = 0
        self._lag_max_s = settings.worker_loop_lag_max_ms / 1000
        self._cpu_max = settings.worker_cpu_max
        self._memory_max_kb = settings.worker_memory_max_mb * 1024
        self._lags: collections.deque[float] = collections.deque(maxlen=_LAG_WINDOW)
        self.lag_s = 0.0
        self.cpu = 0.0
        self.rss_kb = resident_kb()
        self._idle_rss_kb = self.rss_kb
        # What the process uses with no job at all (heartbeats, listeners): not a job's cost.
        self._idle_cpu: float | None = None
        # Learned running costs of one job: share of a core, resident KB. None until measured.
        self.cpu_per_job: float | None = None
        # The most jobs it ran with its loop on time, learned AIMD-fashion from steady samples: a
        # machine shared with other work gives a process less than the CPU it could use, and
        # then only the lag says so. None until a steady sample ran late.
        self.lag_cap: int | None = None
        self.kb_per_job: float | None = None
        self._started = 0
        self._finished = 0
        self.started_per_s = 0.0
        self.finished_per_s = 0.0
        self._changed = asyncio.Event()  # set when room may have opened
        self._sample_due: float | None = None  # when the lag sampler's sleep should end (loop time)

    def note_started(self, jobs: int = 1) -> None:
        self._started += jobs

    def note_finished(self) -> None:
        self._finished += 1
        self._changed.set()

    def current_lag_s(self) -> float:
        """The measured lag, or more if the sampler's own wake-up is overdue right now.

        A burst's jobs start all at once: the sampler's next wake-up can be late by far more
        than its last sample said before it ever runs, and pickup must see that at once.
        """
        if self._sample_due is None:
            return self.lag_s
        return max(self.lag_s, asyncio.get_running_loop().time() - self._sample_due)

    @property
    def lagging(self) -> bool:
        """The event loop is late beyond the limit: no new job starts here meanwhile."""
        return self.current_lag_s() > self._lag_max_s

    @property
    def overwhelmed(self) -> bool:
        """The loop is so late (4× the limit) that a timeout seen now is this process's, not a provider's.

        A few tens of milliseconds of lag cannot make a timeout of seconds expire; a loop that
        runs hundreds of milliseconds late can, and then the provider is not to blame.
        """
        return self.current_lag_s() > 4 * self._lag_max_s

    def capacity(self) -> int:
        """Jobs this worker can run at once by its measured costs (the job cap at most)."""
        jobs = self._max_jobs
        if self.cpu_per_job is None:
            # Nothing measured yet (a fresh worker, or none of its loads held steady): only
            # what it has carried on time says what it can carry.
            jobs = min(jobs, max(self._start_capacity, 2 * self.carried))
        if self.cpu_per_job:
            jobs = min(jobs, int(max(self._cpu_max - (self._idle_cpu or 0.0), 0) / self.cpu_per_job))
        if self.lag_cap is not None:
            jobs = min(jobs, self.lag_cap)
        if self._memory_max_kb and self.kb_per_job:
            jobs = min(jobs, int((self._memory_max_kb - self._idle_rss_kb) / self.kb_per_job))
        return jobs

    def room(self) -> int:
        """Jobs it may start now: 0 while its loop lags or it runs all it can."""
        return 0 if self.lagging else self.free()

    def memory_full(self) -> bool:
        """At the memory limit (when one is set): nothing more starts here, however long it waited."""
        return bool(self._memory_max_kb) and self.rss_kb >= self._memory_max_kb

    def free(self) -> int:
        """Jobs it can take on by its capacity, lag aside: a late loop catches up within moments,
        so the pool's published load (what the API refuses by) does not count it."""
        if self.memory_full():
            return 0
        return max(self.capacity() - self._running(), 0)

    async def wait_for_room(self) -> None:
        """Return once a job may start (looked at again on every lag sample and every job's end)."""
        while self.room() <= 0:
            self._changed.clear()
            await self._changed.wait()

    def record(self, ttl_s: float) -> WorkerLoad:
        """The load record to publish, valid for `ttl_s`."""
        return WorkerLoad(running=self._running(), room=self.free(), started_per_s=round(self.started_per_s, 2),
                          finished_per_s=round(self.finished_per_s, 2), lag_ms=round(self.lag_s * 1000, 1),
                          lagging=self.lagging,
                          cpu=round(self.cpu, 3), rss_kb=self.rss_kb,
                          expires_unix_ms=int((time.time() + ttl_s) * 1000))

    async def watch(self) -> None:
        """Measure forever (a task of the worker)."""
        measuring = asyncio.create_task(self._measure(), name="capacity-measure")
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._sample_due = loop.time() + LAG_SAMPLE_S
                await asyncio.sleep(LAG_SAMPLE_S)
                self._lags.append(max(loop.time() - self._sample_due, 0.0))
                self.lag_s = statistics.median(self._lags)
                self._changed.set()
        finally:
            measuring.cancel()

    async def _measure(self) -> None:
        last_cpu, last_at = time.process_time(), time.monotonic()
        while True:
            await asyncio.sleep(MEASURE_EVERY_S)
            cpu, at = time.process_time(), time.monotonic()
            self.observe(cpu - last_cpu, at - last_at, resident_kb())
            last_cpu, last_at = cpu, at

    def _follow_lag(self, running: int) -> None:
        """A steady load that keeps the loop late is more than this process gets CPU for: cap
        below it (30 % less); one on time near the cap earns 5 % more, like TCP's window."""
        if self.lag_s > self._lag_max_s:
            self.lag_cap = max(int(running * _DECREASE), 1)
        elif self.lag_cap is not None and self.lag_s < self._lag_max_s / 2 and running >= self.lag_cap * 0.9:
            self.lag_cap = min(int(self.lag_cap * _INCREASE) + 1, self._max_jobs)

    def observe(self, cpu_s: float, wall_s: float, rss_kb: int) -> None:
        """One measurement: CPU used and wall time elapsed since the last one, memory now."""
        if wall_s <= 0:
            return
        started, finished, self._started, self._finished = self._started, self._finished, 0, 0
        self.cpu = cpu_s / wall_s
        self.rss_kb = rss_kb
        self.started_per_s += _EWMA * (started / wall_s - self.started_per_s)
        self.finished_per_s += _EWMA * (finished / wall_s - self.finished_per_s)
        running = self._running()
        if self.lag_s <= self._lag_max_s:
            self.carried = max(self.carried, running)
        if running == 0:
            # A cap learned while other work crowded the machine need not hold for ever: idle, it
            # is forgotten slowly (about 4 % a second), and the next load teaches it again.
            if self.lag_cap is not None and not self.lagging:
                self.lag_cap = min(int(self.lag_cap * _IDLE_RELAX) + 1, self._max_jobs)
            self._idle_rss_kb = min(self._idle_rss_kb, rss_kb) if self._idle_rss_kb else rss_kb
            if started == finished == 0:
                self._idle_cpu = self.cpu if self._idle_cpu is None else self._idle_cpu + _EWMA * (
                    self.cpu - self._idle_cpu)
            return
        if running < _STEADY_MIN_JOBS or started > running * _STEADY_MAX_STARTS:
            return
        self._follow_lag(running)
        per_job = max(self.cpu - (self._idle_cpu or 0.0), 0) / running
        self.cpu_per_job = per_job if self.cpu_per_job is None else self.cpu_per_job + _EWMA * (
            per_job - self.cpu_per_job)
        kb = max(rss_kb - self._idle_rss_kb, 0) / running
        self.kb_per_job = kb if self.kb_per_job is None else self.kb_per_job + _EWMA * (kb - self.kb_per_job)
