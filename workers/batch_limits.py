"""Batch lines against their key's limits and usage, like live requests (docs/keys-and-limits.md).

A claim charges each line to the key's requests per minute and per day and its estimated tokens
per minute (workers/batch_store.py, in the claim script itself); when a limit refuses, the key's
batches pause until that window ends. When a line has run, `bill` writes what a live request's
end writes: usage per day and served model (in the key's batch usage hash), the correction of
tokens per minute from the estimate to the real count (a failure refunds the estimate), and the
upstream attempts for /metrics. One pipelined write per line, off the line's critical path.
"""

import logging
import math
import time
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from settings import Settings
from settings.logfields import STORE_DOWN
from workers.batch_store import KeyBudget, Leased
from workers.protocol import (
    BATCH_UPSTREAM_ATTEMPTS_KEY,
    DAY_S,
    LIMIT_REQUESTS,
    LIMIT_REQUESTS_DAY,
    LIMIT_TOKENS,
    AttemptFailure,
    api_key_id_key,
    api_key_record_key,
    batch_pause_key,
    counter_key,
    counter_ttl_ms,
    tokens_counter_to_correct,
    usage_batch_key,
    usage_field,
    utc_day,
    window_reset_s,
)

log = logging.getLogger("freeference.batches")

# The settings master key owns its batches under this id (the API's MASTER_RECORD): no limits.
MASTER_OWNER = "master"
_DAY_S = DAY_S


def _int(usage: dict[str, Any] | None, field: str) -> int:
    value = (usage or {}).get(field)
    return value if isinstance(value, int) and value >= 0 else 0


class BatchAccounting:
    """One per worker process: builds claim budgets and bills finished lines."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._tier_defaults = orjson.dumps({tier: settings.tier_limits(tier) for tier in ("free", "pro")})
        self._digests: dict[str, str] = {}  # key id → sha256 of the key (never changes)

    async def budget(self, owner: str, now_s: float) -> KeyBudget | None:
        """How a claim made now charges the owner's limits; None for the master key (no limits)."""
        if owner == MASTER_OWNER:
            return None
        digest = self._digests.get(owner)
        if digest is None:
            raw = await self._redis.get(api_key_id_key(owner))
            digest = raw.decode() if raw else ""
            if digest:
                self._digests[owner] = digest
        window_s = self._settings.rate_window_s
        windows = ((LIMIT_REQUESTS, window_s), (LIMIT_TOKENS, window_s), (LIMIT_REQUESTS_DAY, _DAY_S))
        counters = tuple(counter_key(owner, name, span, now_s) for name, span in windows)
        ttls = tuple(counter_ttl_ms(span, now_s) for _, span in windows)
        resets = tuple(math.ceil(window_reset_s(span, now_s) * 1000) for _, span in windows)
        # An id that names no key (it never existed) reads as no record: the claim says 'revoked'.
        return KeyBudget(record_key=api_key_record_key(digest or "none"), pause_key=batch_pause_key(owner),
                         counters=(counters[0], counters[1], counters[2]), ttls_ms=(ttls[0], ttls[1], ttls[2]),
                         resets_ms=(resets[0], resets[1], resets[2]), tier_defaults=self._tier_defaults,
                         share=self._settings.batch_rate_share)

    async def bill(self, owner: str, leased: Leased, charged_at_s: float, model: str, *,
                   usage: dict[str, Any] | None, failed: bool, failures: list[AttemptFailure],
                   served_by: str | None) -> None:
        """Account one run of a line (see the module docstring); a Redis error loses only this bill."""
        now = time.time()
        prompt, completion = (0, 0) if failed else (_int(usage, "prompt_tokens"), _int(usage, "completion_tokens"))
        counts = {"requests": 1, "prompt_tokens": prompt, "completion_tokens": completion, "failures": int(failed)}
        if failed:
            delta = -leased.tokens_charged
        else:  # without a usage block the estimate stands
            delta = (_int(usage, "total_tokens") or prompt + completion) - leased.tokens_charged if usage else 0
        window_s = self._settings.rate_window_s
        counter = tokens_counter_to_correct(counter_key(owner, LIMIT_TOKENS, window_s, charged_at_s),
                                            counter_key(owner, LIMIT_TOKENS, window_s, now), delta)
        key = usage_batch_key(owner, utc_day(now))
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for metric, value in counts.items():
                    if value:
                        pipe.hincrby(key, usage_field(model, metric), value)
                pipe.expire(key, self._settings.usage_retention_days * _DAY_S)
                if counter is not None and leased.tokens_charged:
                    pipe.incrby(counter, delta)
                    pipe.pexpire(counter, counter_ttl_ms(window_s, now))
                for failure in failures:
                    pipe.hincrby(BATCH_UPSTREAM_ATTEMPTS_KEY, f"{failure.provider}|{failure.reason}", 1)
                if served_by is not None:
                    pipe.hincrby(BATCH_UPSTREAM_ATTEMPTS_KEY, f"{served_by}|ok", 1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("usage of a batch line of %s not recorded: %s", owner, type(exc).__name__, extra=STORE_DOWN)
