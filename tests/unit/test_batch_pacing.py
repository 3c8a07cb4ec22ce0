"""The batch pacing governor: AIMD on event-loop lag, within [1, max]."""

from workers.batch_pacing import LagGovernor


def test_backs_off_on_lag_and_recovers_when_calm() -> None:
    governor = LagGovernor(max_lines=32, target_lag_s=0.02)
    assert governor.limit == 8  # starts low, earns the rest
    for _ in range(100):
        governor.observe(0.001)
    assert governor.limit == 32  # never above the maximum
    governor.observe(0.05)
    assert governor.limit == 22  # a late sample cuts 30 %
    for _ in range(20):
        governor.observe(0.5)
    assert governor.limit == 1  # never below one line: batches always progress
    governor.observe(0.015)  # between half the target and the target: hold
    assert governor.limit == 1
    governor.observe(0.0)
    assert governor.limit == 2


def test_disabled_runs_at_the_maximum() -> None:
    governor = LagGovernor(max_lines=16, target_lag_s=0)
    governor.observe(1.0)
    assert governor.limit == 16
