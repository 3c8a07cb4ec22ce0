"""Markers that log lines carry for the process's log setup (cli/logging_setup.py).

During a Redis outage every loop and every job of a process notices it at once; logged one by
one, that was dozens of warnings and tracebacks per process per outage. Code marks such lines
instead (`log.warning(..., extra=STORE_DOWN)`), and the log setup lets one through per outage.
"""

from typing import Final

# A line saying the shared store (Redis) cannot be reached right now.
STORE_DOWN_FIELD: Final = "store_down"
STORE_DOWN: Final = {STORE_DOWN_FIELD: True}
# The store answers again: the outage is over (logged only if one was going on).
STORE_UP_FIELD: Final = "store_up"
STORE_UP: Final = {STORE_UP_FIELD: True}
