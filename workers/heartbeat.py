"""The worker's heartbeat, written from a thread: a late event loop is slow, not dead.

The API fails a stream as `worker_lost` when its worker's heartbeat key has lapsed
(api/dispatch.py). Written from the event loop, the key lapsed whenever the loop ran late by
more than its TTL: on a machine with more runnable processes than cores, a burst's start kept
a worker's loop seconds late and its key expired, so hundreds of healthy streams were failed
as lost while their worker was only catching up (docs/performance.md). A thread gets the
interpreter at every switch interval however busy the loop is, so the key now says whether
the process is alive. A killed or stopped process writes nothing and its key lapses after the
TTL, as before; a loop that has not run for `_LOOP_STUCK_MAX_S` serves nobody, so the thread
stops renewing the key then and its streams are failed over to the caller as lost.
"""

import logging
import threading
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from settings.logfields import STORE_DOWN, STORE_UP
from settings.redis_url import blocking_redis_client

log = logging.getLogger("freeference.worker")

# A loop this late is wedged, not busy (the capacity meter stops new work long before).
_LOOP_STUCK_MAX_S = 30.0
_REDIS_TIMEOUT_S = 2.0


class HeartbeatThread:
    """Renews the heartbeat key and the worker's entry in the worker set every `every_s`."""

    def __init__(self, redis_url: str, key: str, workers_key: str, worker_id: str, every_s: float, ttl_s: float,
                 info: Callable[[], bytes]) -> None:
        self._redis = blocking_redis_client(redis_url, socket_timeout=_REDIS_TIMEOUT_S,
                                            socket_connect_timeout=_REDIS_TIMEOUT_S)
        self._key = key
        self._workers_key = workers_key
        self._worker_id = worker_id
        self._every_s = every_s
        self._ttl_ms = int(ttl_s * 1000)
        self._info = info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.loop_seen = time.monotonic()  # set by the event loop (loop_alive) each beat

    def start(self) -> None:
        self._thread.start()

    def loop_alive(self) -> None:
        """Called from the event loop: it still runs."""
        self.loop_seen = time.monotonic()

    def stop(self, timeout_s: float = _REDIS_TIMEOUT_S + 1) -> None:
        """No more writes after this returns (the caller deletes the key next)."""
        self._stop.set()
        self._thread.join(timeout_s)
        self._redis.close()

    def beat(self) -> bool:
        """Write the key once, unless the loop is stuck; False when nothing was written."""
        if time.monotonic() - self.loop_seen > _LOOP_STUCK_MAX_S:
            return False
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self._key, self._info(), px=self._ttl_ms)
                pipe.zadd(self._workers_key, {self._worker_id: int(time.time() * 1000) + self._ttl_ms})
                pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("heartbeat not written (%s)", type(exc).__name__, extra=STORE_DOWN)
            return False
        # Ends an outage the log is holding back (said once a beat, logged only after one).
        log.info("redis reachable again", extra=STORE_UP)
        return True

    def _run(self) -> None:
        while True:
            self.beat()
            if self._stop.wait(self._every_s):
                return
