"""The failover policy as data: upstream outcome → retry, wait, then what (DESIGN.md §5).

The executor never decides on an exception type directly: it classifies the failure into an
Outcome and follows that outcome's Rule. docs/failover.md shows the same table for users.
"""

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from router.errors import (
    ContentRejected,
    ContextTooLong,
    ModelUnavailable,
    NotServable,
    RateLimited,
    RequestRejected,
    StreamBroken,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamServerError,
    UpstreamTimeout,
)
from settings import Settings


class Outcome(StrEnum):
    RATE_LIMITED_SHORT = "429 short Retry-After"
    RATE_LIMITED_LONG = "429 long Retry-After"
    RATE_LIMITED_NO_HINT = "429 without Retry-After"
    QUOTA_EXHAUSTED = "daily / account quota (429, 402)"
    NOT_SERVABLE = "this deployment cannot serve this request"
    SERVER_ERROR = "5xx / reset / refused"
    TIMEOUT = "connect / first-token / idle timeout"
    CONTEXT_TOO_LONG = "400 context length"
    REJECTED = "400 content policy / other request error"
    AUTH_FAILED = "401/403 (our key)"
    MODEL_GONE = "404 model not found"
    STREAM_BROKEN = "stream cut / garbage"


Wait = Literal["none", "retry_after", "jittered"]
Then = Literal["failover", "failover_larger_context", "return"]
# park: the key's quota (at the provider's scope: key, key and model, or account) sits out the
# wait; unsupported: this deployment is remembered as lacking what the request needed.
Health = Literal["none", "park", "failure", "ban_key", "gone", "unsupported"]


@dataclass(frozen=True)
class Rule:
    """What to do after one failed attempt with this outcome."""

    same_deployment_retries: int  # extra attempts on the same deployment
    wait: Wait  # how long before such a retry
    then: Then  # when retries are used up (or there are none)
    health: Health  # what the shared health learns from it


POLICY: dict[Outcome, Rule] = {
    Outcome.RATE_LIMITED_SHORT: Rule(1, "retry_after", "failover", "park"),
    Outcome.RATE_LIMITED_LONG: Rule(0, "none", "failover", "park"),
    Outcome.RATE_LIMITED_NO_HINT: Rule(1, "jittered", "failover", "park"),
    # A day cap or an empty account: no call before its reset (at most one per reset window).
    Outcome.QUOTA_EXHAUSTED: Rule(0, "none", "failover", "park"),
    # Another model may well serve it; this one is not cooled for everyone else's requests.
    Outcome.NOT_SERVABLE: Rule(0, "none", "failover", "unsupported"),
    Outcome.SERVER_ERROR: Rule(1, "jittered", "failover", "failure"),
    # A silent route only multiplies the wait: never retried.
    Outcome.TIMEOUT: Rule(0, "none", "failover", "failure"),
    Outcome.CONTEXT_TOO_LONG: Rule(0, "none", "failover_larger_context", "none"),
    # A safety refusal or a bad parameter is the caller's to see, not something to route around.
    Outcome.REJECTED: Rule(0, "none", "return", "none"),
    Outcome.AUTH_FAILED: Rule(0, "none", "failover", "ban_key"),
    Outcome.MODEL_GONE: Rule(0, "none", "failover", "gone"),
    Outcome.STREAM_BROKEN: Rule(0, "none", "failover", "failure"),
}


@dataclass(frozen=True)
class Tuning:
    """The numbers behind the rules, from settings."""

    short_retry_after_max_s: float = 5.0
    retry_backoff_s: float = 0.2
    rate_limit_backoff_s: float = 0.5
    rate_limit_cooldown_s: float = 10.0
    quota_park_default_s: float = 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Tuning":
        """Tuning from the process settings."""
        return cls(settings.short_retry_after_max_s, settings.retry_backoff_s, settings.rate_limit_backoff_s,
                   settings.rate_limit_cooldown_s, settings.quota_park_default_s)


def classify(error: UpstreamError, tuning: Tuning) -> Outcome:
    """The policy row for one typed upstream failure."""
    if isinstance(error, RateLimited):
        if error.daily:
            return Outcome.QUOTA_EXHAUSTED
        if error.retry_after_s is None:
            return Outcome.RATE_LIMITED_NO_HINT
        if error.retry_after_s <= tuning.short_retry_after_max_s:
            return Outcome.RATE_LIMITED_SHORT
        return Outcome.RATE_LIMITED_LONG
    if isinstance(error, UpstreamTimeout):
        return Outcome.TIMEOUT
    if isinstance(error, UpstreamServerError):
        return Outcome.SERVER_ERROR
    if isinstance(error, NotServable):
        return Outcome.NOT_SERVABLE
    if isinstance(error, ContextTooLong):
        return Outcome.CONTEXT_TOO_LONG
    if isinstance(error, ContentRejected | RequestRejected):
        return Outcome.REJECTED
    if isinstance(error, UpstreamAuthFailed):
        return Outcome.AUTH_FAILED
    if isinstance(error, ModelUnavailable):
        return Outcome.MODEL_GONE
    if isinstance(error, StreamBroken):
        return Outcome.STREAM_BROKEN
    return Outcome.SERVER_ERROR


def retry_wait_s(outcome: Outcome, error: UpstreamError, retry_number: int, tuning: Tuning,
                 rng: random.Random | None = None) -> float:
    """Seconds to wait before retry `retry_number` (1-based) on the same deployment.

    Jittered waits are "equal jitter" (half fixed, half random) so they are never near zero:
    a failing upstream is never hit in a tight loop.
    """
    rule = POLICY[outcome]
    if rule.wait == "none":
        return 0.0
    if rule.wait == "retry_after":
        assert isinstance(error, RateLimited) and error.retry_after_s is not None
        return float(error.retry_after_s)  # exactly what was asked for, never sooner
    base = tuning.rate_limit_backoff_s if outcome is Outcome.RATE_LIMITED_NO_HINT else tuning.retry_backoff_s
    ceiling: float = base * 2.0 ** (retry_number - 1)
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def park_s(outcome: Outcome, error: UpstreamError, tuning: Tuning) -> float:
    """How long a quota failure parks the key at its scope (0 = not at all): exactly the wait the
    provider stated; a default when it stated none."""
    if POLICY[outcome].health != "park":
        return 0.0
    if isinstance(error, RateLimited) and error.retry_after_s:
        return error.retry_after_s
    if outcome is Outcome.QUOTA_EXHAUSTED:
        return tuning.quota_park_default_s
    return tuning.rate_limit_cooldown_s
