"""Usage accounting per key, per UTC day, per model — written API-side when a job ends.

Batch lines are billed by the workers that run them, by the same rules, into a hash of their
own (usage_batch_key), so usage shows live requests and batch lines apart and in one total.

The worker's `done` event carries the served model and the provider's usage; an `error` event
(or a lost worker, or a deadline) is a failure: counted as a request and a failure, never
billed as tokens. The same pipelined write corrects the tokens-per-minute counter charged at
admission from the estimate to the real total (a failure refunds the estimate). A success is
written beside the answer, not before it: the caller does not wait for a Redis round trip that
only bookkeeping needs.
"""

import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import anyio
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.admission import Admission
from api.background import BackgroundWrites
from api.ratelimit import counter_ttl_ms
from settings.logfields import STORE_DOWN
from workers.protocol import (
    DAY_S,
    USAGE_METRICS,
    DoneEvent,
    RouteInfo,
    StartEvent,
    tokens_counter_to_correct,
    usage_batch_key,
    usage_field,
    usage_key,
    utc_day,
)

log = logging.getLogger("freeference.usage")

METRICS = USAGE_METRICS
_DAY_S = DAY_S


class ModelUsage(BaseModel):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0

    def add(self, other: "ModelUsage") -> None:
        """Accumulate another count into this one."""
        for metric in METRICS:
            setattr(self, metric, getattr(self, metric) + getattr(other, metric))


class DayUsage(BaseModel):
    date: str
    models: dict[str, ModelUsage]  # live requests, per served model
    batch: dict[str, ModelUsage] = Field(default_factory=dict)  # batch lines, per served model
    total: ModelUsage  # live requests and batch lines


class KeyUsage(BaseModel):
    key_id: str
    days: list[DayUsage]
    total: ModelUsage  # live requests and batch lines
    batch_total: ModelUsage = Field(default_factory=ModelUsage)  # the batch lines' part of it


def _int(usage: dict[str, Any] | None, field: str) -> int:
    value = (usage or {}).get(field)
    return value if isinstance(value, int) and value >= 0 else 0


class UsageRecorder:
    """Records one chat request's outcome exactly once."""

    def __init__(self, redis: Redis, admission: Admission, retention_days: int,
                 background: BackgroundWrites | None = None) -> None:
        self._redis = redis
        self._background = background
        # What billing needs of the admission, not the admission itself (its key record and limit
        # states): a stream holds this recorder for as long as it lasts.
        self._key_id = admission.key.id
        self._token_estimate = admission.token_estimate
        self._tokens_limit = admission.tokens_limit
        self._admitted_at_s = admission.admitted_at_s
        self._model = "auto"
        self._retention_s = retention_days * _DAY_S
        self._jobs = 0
        self.recorded = False
        # The parsed start route and done event, so the route relaying them does not parse again.
        self.route: RouteInfo | None = None
        self.done: DoneEvent | None = None

    def begin(self, requested_model: str | None) -> None:
        """A job of this request starts (again, after its worker was lost before the first chunk)."""
        self._jobs += 1
        self._model = requested_model or "auto"  # until the worker names the model it started

    async def note(self, event_type: str, payload: bytes) -> None:
        """Record what one of the job's events says, before it is relayed (chunks say nothing here)."""
        if event_type == "start":
            self.route = StartEvent.model_validate_json(payload).route
            self._model = self.route.model
        elif event_type == "done":
            self.done = DoneEvent.model_validate_json(payload)
            if self._background is None:
                await self.succeeded(self.done)
            else:
                write = self._bill_success(self.done)
                if write is not None:
                    self._background.spawn(write)
        elif event_type == "error":
            await self.failed()

    async def abandoned(self) -> None:
        """The caller went away (or the request was cancelled) before an outcome was recorded.

        The request still happened; its real token count never arrives, so the admission
        estimate stands.
        """
        if not self.recorded:
            with anyio.CancelScope(shield=True):
                await self._write(self._model, 0, 0, failure=False, tokens_delta=0)

    async def succeeded(self, done: DoneEvent) -> None:
        """Bill the served model with the provider's usage; correct tokens-per-minute."""
        write = self._bill_success(done)
        if write is not None:
            await write

    def _bill_success(self, done: DoneEvent) -> Coroutine[Any, Any, None] | None:
        usage = done.usage
        prompt, completion = _int(usage, "prompt_tokens"), _int(usage, "completion_tokens")
        actual = _int(usage, "total_tokens") or prompt + completion
        # Without a usage block the estimate stands: better than refunding tokens that were spent.
        return self._bill(done.route.model, prompt, completion, failure=False,
                          tokens_delta=actual - self._token_estimate if usage else 0)

    async def failed(self) -> None:
        """Count a failed request (no tokens billed); refunds the admission estimate."""
        if self._jobs:
            await self._write(self._model, 0, 0, failure=True, tokens_delta=-self._token_estimate)

    async def _write(self, model: str, prompt: int, completion: int, *, failure: bool, tokens_delta: int) -> None:
        write = self._bill(model, prompt, completion, failure=failure, tokens_delta=tokens_delta)
        if write is not None:
            await write

    def _bill(self, model: str, prompt: int, completion: int, *, failure: bool,
              tokens_delta: int) -> Coroutine[Any, Any, None] | None:
        """The write of this request's one outcome; None when it is already recorded.

        Marked recorded at once (not when the write lands), so a caller leaving while a
        success is being written cannot record the request a second time.
        """
        if self.recorded:
            return None
        self.recorded = True
        return self._send(model, prompt, completion, failure=failure, tokens_delta=tokens_delta)

    async def _send(self, model: str, prompt: int, completion: int, *, failure: bool, tokens_delta: int) -> None:
        now = time.time()
        key = usage_key(self._key_id, utc_day(now))
        counts = {"requests": 1, "prompt_tokens": prompt, "completion_tokens": completion, "failures": int(failure)}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for metric, value in counts.items():
                    if value:
                        pipe.hincrby(key, usage_field(model, metric), value)
                pipe.expire(key, self._retention_s)
                tokens = self._tokens_limit
                if tokens is not None:
                    counter = tokens_counter_to_correct(tokens.redis_key(self._admitted_at_s),
                                                        tokens.redis_key(now), tokens_delta)
                    if counter is not None:
                        pipe.incrby(counter, tokens_delta)
                        pipe.pexpire(counter, counter_ttl_ms(tokens.window_s, now))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # The answer already exists; losing one accounting line must not turn it into an error.
            log.warning("usage for %s not recorded: %s", self._key_id, type(exc).__name__,
                        extra=STORE_DOWN)


def _per_model(raw: dict[bytes, bytes]) -> dict[str, ModelUsage]:
    models: dict[str, ModelUsage] = {}
    for field, value in raw.items():
        model, _, metric = field.decode().rpartition("|")
        if metric in METRICS:
            entry = models.setdefault(model, ModelUsage())
            setattr(entry, metric, getattr(entry, metric) + int(value))
    return dict(sorted(models.items()))


def _sum(*groups: dict[str, ModelUsage]) -> ModelUsage:
    total = ModelUsage()
    for group in groups:
        for entry in group.values():
            total.add(entry)
    return total


def _parse_day(date: str, live: dict[bytes, bytes], batch: dict[bytes, bytes]) -> DayUsage:
    models, batch_models = _per_model(live), _per_model(batch)
    return DayUsage(date=date, models=models, batch=batch_models, total=_sum(models, batch_models))


async def read_usage(redis: Redis, key_ids: Sequence[str], days: int = 7,
                     now_s: float | None = None) -> list[KeyUsage]:
    """Usage of these keys over the last `days` UTC days (today included), newest day first."""
    now = time.time() if now_s is None else now_s
    dates = [utc_day(now - i * _DAY_S) for i in range(days)]
    async with redis.pipeline(transaction=False) as pipe:
        for key_id in key_ids:
            for date in dates:
                pipe.hgetall(usage_key(key_id, date))
                pipe.hgetall(usage_batch_key(key_id, date))
        raws = await pipe.execute()
    out: list[KeyUsage] = []
    for i, key_id in enumerate(key_ids):
        per_day = [_parse_day(date, raws[2 * (i * days + j)], raws[2 * (i * days + j) + 1])
                   for j, date in enumerate(dates)]
        per_day = [d for d in per_day if d.models or d.batch]
        total, batch_total = ModelUsage(), ModelUsage()
        for day in per_day:
            total.add(day.total)
            batch_total.add(_sum(day.batch))
        out.append(KeyUsage(key_id=key_id, days=per_day, total=total, batch_total=batch_total))
    return out
