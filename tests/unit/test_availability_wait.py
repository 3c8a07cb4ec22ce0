"""When no candidate may be tried now, how long a request waits before it is answered 503."""

from router.select import NoneAvailable
from workers.jobs import _availability_wait_s

JITTER_S = 0.2


def test_waits_for_the_soonest_candidate_with_jitter() -> None:
    wait = _availability_wait_s(NoneAvailable(1.5), waited_s=0, max_wait_s=5, budget_s=30)
    assert wait is not None and 1.5 <= wait <= 1.5 + JITTER_S


def test_gone_candidates_are_not_waited_for() -> None:
    assert _availability_wait_s(NoneAvailable(5, wait_known=False), waited_s=0, max_wait_s=5, budget_s=30) is None


def test_total_wait_is_capped() -> None:
    assert _availability_wait_s(NoneAvailable(2), waited_s=2.5, max_wait_s=5, budget_s=30) is not None
    assert _availability_wait_s(NoneAvailable(2), waited_s=3.5, max_wait_s=5, budget_s=30) is None
    assert _availability_wait_s(NoneAvailable(6), waited_s=0, max_wait_s=5, budget_s=30) is None


def test_never_waits_into_the_deadline() -> None:
    # At least a second of the request's budget must remain for the attempt after the wait.
    assert _availability_wait_s(NoneAvailable(1), waited_s=0, max_wait_s=5, budget_s=1.5) is None
    assert _availability_wait_s(NoneAvailable(1), waited_s=0, max_wait_s=5, budget_s=3) is not None


def test_zero_max_wait_answers_at_once() -> None:
    assert _availability_wait_s(NoneAvailable(1), waited_s=0, max_wait_s=0, budget_s=30) is None
