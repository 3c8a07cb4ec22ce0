"""The policy table (DESIGN.md §5) as data: classification, retry waits, quota parks."""

import random

import pytest

from router.errors import (
    ContentRejected,
    ContextTooLong,
    ModelUnavailable,
    NotServable,
    RateLimited,
    RequestRejected,
    StreamBroken,
    UpstreamAuthFailed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamServerError,
    UpstreamTimeout,
)
from router.policy import POLICY, Outcome, Tuning, classify, park_s, retry_wait_s

TUNING = Tuning(short_retry_after_max_s=5, retry_backoff_s=0.2, rate_limit_backoff_s=0.5, rate_limit_cooldown_s=10)


@pytest.mark.parametrize(("error", "outcome"), [
    (RateLimited("slow down", retry_after_s=2), Outcome.RATE_LIMITED_SHORT),
    (RateLimited("slow down", retry_after_s=5), Outcome.RATE_LIMITED_SHORT),
    (RateLimited("slow down", retry_after_s=5.01), Outcome.RATE_LIMITED_LONG),
    (RateLimited("slow down", retry_after_s=None), Outcome.RATE_LIMITED_NO_HINT),
    (RateLimited("free-models-per-day", retry_after_s=3600, daily=True), Outcome.QUOTA_EXHAUSTED),
    (RateLimited("out of credits", retry_after_s=None, status=402, daily=True), Outcome.QUOTA_EXHAUSTED),
    (NotServable("no endpoints found that support tool use", status=404, feature="tools"), Outcome.NOT_SERVABLE),
    (UpstreamServerError("boom", status=503), Outcome.SERVER_ERROR),
    (UpstreamConnectError("refused"), Outcome.SERVER_ERROR),
    (UpstreamTimeout("silent", phase="first_token"), Outcome.TIMEOUT),
    (UpstreamTimeout("silent", phase="connect"), Outcome.TIMEOUT),
    (ContextTooLong("too long", status=400), Outcome.CONTEXT_TOO_LONG),
    (ContentRejected("unsafe", status=400), Outcome.REJECTED),
    (RequestRejected("bad param", status=422), Outcome.REJECTED),
    (UpstreamAuthFailed("bad key", status=401), Outcome.AUTH_FAILED),
    (ModelUnavailable("no such model", status=404), Outcome.MODEL_GONE),
    (StreamBroken("cut"), Outcome.STREAM_BROKEN),
])
def test_classify(error: UpstreamError, outcome: Outcome) -> None:
    assert classify(error, TUNING) is outcome


def test_table_rows_match_the_design() -> None:
    # (retries on the same deployment, then) for every row of DESIGN.md §5.
    expected = {
        Outcome.RATE_LIMITED_SHORT: (1, "retry_after", "failover"),
        Outcome.RATE_LIMITED_LONG: (0, "none", "failover"),
        Outcome.RATE_LIMITED_NO_HINT: (1, "jittered", "failover"),
        Outcome.SERVER_ERROR: (1, "jittered", "failover"),
        Outcome.TIMEOUT: (0, "none", "failover"),
        Outcome.CONTEXT_TOO_LONG: (0, "none", "failover_larger_context"),
        Outcome.REJECTED: (0, "none", "return"),
        Outcome.AUTH_FAILED: (0, "none", "failover"),
        Outcome.MODEL_GONE: (0, "none", "failover"),
        Outcome.STREAM_BROKEN: (0, "none", "failover"),
        Outcome.QUOTA_EXHAUSTED: (0, "none", "failover"),
        Outcome.NOT_SERVABLE: (0, "none", "failover"),
    }
    assert set(POLICY) == set(Outcome)
    for outcome, (retries, wait, then) in expected.items():
        rule = POLICY[outcome]
        assert (rule.same_deployment_retries, rule.wait, rule.then) == (retries, wait, then), outcome
    assert POLICY[Outcome.AUTH_FAILED].health == "ban_key"
    assert POLICY[Outcome.SERVER_ERROR].health == "failure"
    assert POLICY[Outcome.TIMEOUT].health == "failure"
    # (b) is never cooled for everyone; (d) parks the key at its scope instead of cooling the route.
    assert POLICY[Outcome.NOT_SERVABLE].health == "unsupported"
    assert {POLICY[o].health for o in (Outcome.RATE_LIMITED_SHORT, Outcome.RATE_LIMITED_LONG,
                                       Outcome.RATE_LIMITED_NO_HINT, Outcome.QUOTA_EXHAUSTED)} == {"park"}


def test_short_retry_after_is_waited_exactly() -> None:
    error = RateLimited("slow down", retry_after_s=1.7)
    assert retry_wait_s(Outcome.RATE_LIMITED_SHORT, error, 1, TUNING) == 1.7


@pytest.mark.parametrize("outcome", [Outcome.SERVER_ERROR, Outcome.RATE_LIMITED_NO_HINT])
def test_jittered_waits_are_never_near_zero_and_grow(outcome: Outcome) -> None:
    rng = random.Random(7)
    base = TUNING.rate_limit_backoff_s if outcome is Outcome.RATE_LIMITED_NO_HINT else TUNING.retry_backoff_s
    error = UpstreamServerError("x")
    for retry in (1, 2, 3):
        waits = [retry_wait_s(outcome, error, retry, TUNING, rng) for _ in range(200)]
        ceiling = base * 2 ** (retry - 1)
        assert min(waits) >= ceiling / 2
        assert max(waits) <= ceiling
        assert len(set(waits)) > 100  # jittered, not a fixed beat that synchronises workers


@pytest.mark.parametrize("outcome", [Outcome.TIMEOUT, Outcome.RATE_LIMITED_LONG, Outcome.AUTH_FAILED])
def test_no_wait_for_rows_without_retry(outcome: Outcome) -> None:
    assert retry_wait_s(outcome, UpstreamError("x"), 1, TUNING) == 0.0


def test_parks_last_exactly_as_long_as_stated() -> None:
    assert park_s(Outcome.RATE_LIMITED_LONG, RateLimited("x", retry_after_s=120), TUNING) == 120
    assert park_s(Outcome.RATE_LIMITED_SHORT, RateLimited("x", retry_after_s=2), TUNING) == 2
    assert park_s(Outcome.RATE_LIMITED_NO_HINT, RateLimited("x", retry_after_s=None), TUNING) == 10
    assert park_s(Outcome.QUOTA_EXHAUSTED, RateLimited("x", retry_after_s=5000, daily=True), TUNING) == 5000
    # A cap that states no reset (402 out of credits): the configured default.
    assert park_s(Outcome.QUOTA_EXHAUSTED, RateLimited("x", retry_after_s=None, daily=True), TUNING) == 3600
    assert park_s(Outcome.SERVER_ERROR, UpstreamServerError("x"), TUNING) == 0
    assert park_s(Outcome.NOT_SERVABLE, NotServable("x"), TUNING) == 0
