"""Helpers (no tests) shared by the failover, models and chaos tests: a short-timeout catalog, asking."""

import time
from dataclasses import dataclass, field
from typing import Any

import yaml
from redis import Redis

from cli.embedded_redis import free_port
from tests.support.processes import Gateway

KEY_1 = "sk-fake-a-0123456789"  # FAKE_A_KEY in base_env
KEY_2 = "sk-fake-a-second-key-42"
MESSAGES = [{"role": "user", "content": "Tell me about failover."}]

# Short breaker and retry numbers so the policy shows within seconds.
FAST_ENV = {
    "FAKE_A_KEY_2": KEY_2,
    "FREEFERENCE_SHORT_RETRY_AFTER_MAX_S": "2",
    "FREEFERENCE_RETRY_BACKOFF_S": "0.2",
    "FREEFERENCE_RATE_LIMIT_BACKOFF_S": "0.4",
    "FREEFERENCE_RATE_LIMIT_COOLDOWN_S": "5",
    "FREEFERENCE_BREAKER_FAILURE_THRESHOLD": "3",
    "FREEFERENCE_BREAKER_COOLDOWN_S": "1",
    "FREEFERENCE_BREAKER_MAX_COOLDOWN_S": "4",
    "FREEFERENCE_LIVE_DEPLOYMENTS_PUBLISH_S": "0.5",
    # The policy tests expect the best-scored candidate first; spreading is tested on its own.
    "FREEFERENCE_SPREAD_SCORE_BAND": "0",
    # The caller's own limits are not under test here: base_env already sets them far above this traffic.
    "FREEFERENCE_MAX_STREAMS_PER_KEY": "10000",
}


def failover_catalog(upstream_url: str, refresh_models_s: float = 0, idle_s: float = 4) -> str:
    """best (8k, prefill) > backup (32k, prefill) > small (4k, no prefill) > coder for general;
    for code, code-refused (on a port where nothing listens) > coder."""
    timeout = {"connect_s": 1, "first_token_s": 1.5, "idle_s": idle_s, "total_s": 20}
    providers = [
        # A 429 parks the key that got it for all of fake-a's models (as OpenRouter's account-wide limits).
        {"id": "fake-a", "base_url": upstream_url, "api_keys_env": ["FAKE_A_KEY", "FAKE_A_KEY_2"],
         "timeout": timeout, "refresh_models_s": refresh_models_s, "profile": {"limits": {"scope": "key"}}},
        {"id": "fake-b", "base_url": upstream_url, "requires_key": False, "timeout": timeout,
         "refresh_models_s": refresh_models_s},
        # Nothing listens there: every connection is refused.
        {"id": "fake-dead", "base_url": f"http://127.0.0.1:{free_port()}/v1", "requires_key": False,
         "timeout": timeout},
    ]
    models = [
        {"id": "general-best", "provider": "fake-a", "upstream_name": "general-best", "context_window": 8192,
         "capabilities": ["chat"], "scores": {"general": 0.9, "code": 0.5}, "supports_prefill": True,
         "name": "Best General"},
        {"id": "general-backup", "provider": "fake-b", "upstream_name": "general-backup", "context_window": 32768,
         "capabilities": ["chat"], "scores": {"general": 0.8, "code": 0.4}, "supports_prefill": True},
        {"id": "general-small", "provider": "fake-b", "upstream_name": "general-small", "context_window": 4096,
         "capabilities": ["chat"], "scores": {"general": 0.7, "code": 0.3}},
        {"id": "coder", "provider": "fake-a", "upstream_name": "coder", "context_window": 16384,
         "capabilities": ["chat", "code"], "scores": {"code": 0.9, "general": 0.6}},
        {"id": "code-refused", "provider": "fake-dead", "upstream_name": "code-refused", "context_window": 16384,
         "capabilities": ["chat", "code"], "scores": {"code": 0.95}},
    ]
    capabilities = {"text-basic": {"name": "General Chat Model", "intent": "general"},
                    "code": {"name": "Code Model", "intent": "code"}}
    return yaml.safe_dump({"providers": providers, "models": models, "capabilities": capabilities}, sort_keys=False)


def forget_health(gateway: Gateway) -> None:
    """Close every breaker and forget cooling and key state (between tests of one gateway)."""
    with Redis.from_url(gateway.redis_url) as redis:
        for pattern in ("ff:health:*", "ff:probe:*", "ff:keyq:*"):
            keys = list(redis.scan_iter(match=pattern, count=500))
            if keys:
                redis.delete(*keys)


@dataclass
class Answer:
    content: str
    model: str
    headers: dict[str, str]
    usage: Any = None
    finish_reason: str | None = None
    chunks: list[Any] = field(default_factory=list)
    elapsed_s: float = 0.0


def ask(gateway: Gateway, key: str, stream: bool, max_tokens: int = 8, **extra: Any) -> Answer:
    """One chat completion through the openai SDK, streamed or not."""
    client = gateway.client(key, timeout=30)
    started = time.monotonic()
    options = {"stream_options": {"include_usage": True}} if stream else {}
    raw = client.chat.completions.with_raw_response.create(
        model=extra.pop("model", "auto"), messages=extra.pop("messages", MESSAGES), max_tokens=max_tokens,
        stream=stream, **options, **extra)
    headers = dict(raw.headers)
    if not stream:
        completion = raw.parse()
        return Answer(completion.choices[0].message.content or "", completion.model, headers, completion.usage,
                      completion.choices[0].finish_reason, elapsed_s=time.monotonic() - started)
    chunks = list(raw.parse())
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = next((c.choices[0].finish_reason for c in reversed(chunks) if c.choices and c.choices[0].finish_reason),
                  None)
    usage = next((c.usage for c in reversed(chunks) if c.usage), None)
    return Answer(content, chunks[-1].model, headers, usage, finish, chunks, time.monotonic() - started)
